"""
Fine-tuning augmentation on whole batches, on the images' device.

Pipeline order in the fine-tuning step (data.py has already cropped + flipped):
  1. rand_augment(images, draws)            float (B,3,H,W), integer values 0..255
  2. the caller normalises with the ImageNet mean/std
  3. random_erasing(images, draws)          on normalised images, as timm's RandomErasing
  4. mixup_cutmix(images, labels, C, draws) timm's Mixup, with smoothed soft targets

Every image gets its own random draw (except mixup_draws' mode 'batch', one draw for the
whole batch, as timm's default), all from torch's global RNG on the images'
device (the training loop re-seeds it each iteration for exact resume). Each step
has its *_draws function, which draws every random number it needs, and the step
itself draws nothing: torch.compile would draw other numbers than eager mode (and
in another order), so only the draw-free work is compiled. Shapes are static and
nothing syncs with the host: every candidate is computed for the whole batch and
each image picks its own with torch.where, so this can run under torch.compile /
CUDA graphs.

RandAugment is torchvision's RandAugment(num_ops, magnitude, num_magnitude_bins=31,
interpolation=NEAREST or BICUBIC) on PIL images, i.e. Pillow's own operations, which OPS
reproduces exactly: the five geometric ops take interpolation='nearest' or 'bicubic'
(Image.transform / Image.rotate with NEAREST or BICUBIC). (The official MAE recipe uses
bicubic and timm's 'rand-m9-mstd0.5-inc1', a variant with noisy magnitudes.)

Mixup is timm's Mixup: mode 'batch' (its default, and the official MAE recipe's) draws one
lambda, one mixup-or-cutmix choice and one box for the whole batch; mode 'elem' draws
them per image.
"""
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------
# the 14 RandAugment operations, each op(images, magnitude) with magnitude (B,) in
# the op's own units; images are float, integer-valued in [0, 255], as a uint8 PIL image.
# The five geometric ops also take interpolation='nearest' or 'bicubic'.
# Five are one resampling with their own affine matrix (AFFINE) and four are one blend
# towards their own degenerate image (DEGENERATE): rand_augment runs each family once,
# every image with its own matrix or degenerate image, instead of once per op.

INTERPOLATIONS = ('nearest', 'bicubic')

def _check_interpolation(interpolation):
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"rand_augment_interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")

def _affine(images, matrix, interpolation="nearest"):
    # Image.transform(size, AFFINE, matrix, NEAREST or BICUBIC, fillcolor=0), matrix (B, 6) float64
    _check_interpolation(interpolation)
    return _nearest(images, matrix) if interpolation == 'nearest' else _bicubic(images, matrix)

def _nearest(images, matrix):
    # For any image smaller than 32768 px, Pillow takes its 16.16 fixed-point path, reproduced here
    # bit for bit: output (x, y) reads input (a(x+.5) + b(y+.5) + c, d(x+.5) + e(y+.5) + f)
    B, C, H, W = images.shape
    a, b, c, d, e, f = matrix.unbind(1)
    fix = lambda v: torch.floor(v * 65536.0 + 0.5).long().view(B, 1, 1)
    y = torch.arange(H, device=images.device).view(1, H, 1)
    x = torch.arange(W, device=images.device).view(1, 1, W)
    xin = (fix(c + a * 0.5 + b * 0.5) + x * fix(a) + y * fix(b)) >> 16
    yin = (fix(f + d * 0.5 + e * 0.5) + x * fix(d) + y * fix(e)) >> 16
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    index = (yin.clamp(0, H - 1) * W + xin.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    out = images.reshape(B, C, H * W).gather(2, index).view(B, C, H, W)
    return torch.where(inside.unsqueeze(1), out, 0.0)

def _cubic(v1, v2, v3, v4, d):
    # Pillow's BICUBIC macro (cubic convolution with a = -1) at d in [0, 1) between v2 and v3, in
    # its order of operations: same float64 operations, same rounding, same uint8 after truncation
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))

def _bicubic(images, matrix):
    # Pillow's ImagingGenericTransform with bicubic_filter32RGB, all in float64 as there: output
    # (x, y) samples input (a(x+.5) + b(y+.5) + c, d(x+.5) + e(y+.5) + f) if that lies in the image
    # (else 0) from the 4 x 4 pixels around it, edge pixels repeated; clipped, truncated to uint8
    B, C, H, W = images.shape
    a, b, c, d, e, f = (v.view(B, 1, 1) for v in matrix.unbind(1))
    y = torch.arange(H, device=images.device, dtype=torch.float64).view(1, H, 1) + 0.5
    x = torch.arange(W, device=images.device, dtype=torch.float64).view(1, 1, W) + 0.5
    xin, yin = a * x + b * y + c, d * x + e * y + f  # (B, H, W)
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xin, yin = xin - 0.5, yin - 0.5  # pixel centres at integers
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)  # (B, 1, H, W)
    # clamped rows are what Pillow reads too: it clips the first row and repeats the last one in range
    cols = [(x0.long() + k).clamp(0, W - 1) for k in (-1, 0, 1, 2)]
    rows = [(y0.long() + k).clamp(0, H - 1) * W for k in (-1, 0, 1, 2)]
    flat = images.reshape(B, C, H * W)
    tap = lambda row, col: flat.gather(2, (row + col).view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)
    v = [_cubic(*(tap(row, col).double() for col in cols), dx) for row in rows]  # 4 x (B, C, H, W)
    out = _cubic(*v, dy).clamp(0, 255).trunc().to(images.dtype)
    return torch.where(inside.unsqueeze(1), out, 0.0)

def _matrix(like, *entries):
    # (B, 6) float64 affine matrices from numbers and (B,) tensors; float64 like Pillow, so the
    # fixed-point coefficients round as they do there. Fills, not torch.tensor: no host-to-device copy
    return torch.stack([e if isinstance(e, torch.Tensor) else torch.full_like(like, e) for e in entries], 1)

# The matrices are computed as torchvision and Pillow compute them in Python (float64, same
# operations; torch's cos/tan/... may differ from libm's by an ulp, which has not shown in any
# output). Bicubic sampling sees what 16.16 fixed point rounds away: tan(atan(0.5)) != 0.5, and
# an unrounded cos(90 degrees) = 6e-17 moves every sample off the pixel centres.

def _round15(v):
    # Python's round(v, 15), up to an ulp (Python rounds v's exact decimal value)
    return torch.round(v * 1e15) / 1e15

def _rotation(degrees, H, W):
    # Image.rotate(degrees, resample, expand=False, fillcolor=0): counter-clockwise about (W/2, H/2),
    # Pillow's inverse matrix from angle % 360 with cos and sin rounded to 15 decimals, so right
    # angles are exact (where Pillow transposes, the same pixels)
    angle = -(torch.remainder(degrees, 360.0) * (math.pi / 180))  # math.radians
    cos, sin = _round15(torch.cos(angle)), _round15(torch.sin(angle))
    cx, cy = W / 2, H / 2
    return _matrix(degrees, cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)

def _shear_angle(m):
    # torchvision's affine(shear=degrees(atan(m))) takes radians of it again: math.degrees, math.radians
    return torch.atan(m) * (180 / math.pi) * (math.pi / 180)

def _shear_y(m, H, W):
    s = _shear_angle(m)
    return _matrix(m, 1, 0, 0, torch.sin(s) / torch.cos(s), 1, 0)  # torchvision's -sin(-s) / cos(s)

AFFINE = {  # (B,) float64 magnitudes, H, W -> (B, 6) matrices, as torchvision builds them
    'ShearX': lambda m, H, W: _matrix(m, 1, torch.tan(_shear_angle(m)), 0, 0, 1, 0),  # center=[0, 0]
    'ShearY': _shear_y,
    'TranslateX': lambda t, H, W: _matrix(t, 1, 0, -t.trunc(), 0, 1, 0),  # int(magnitude) pixels
    'TranslateY': lambda t, H, W: _matrix(t, 1, 0, 0, 0, 1, -t.trunc()),
    'Rotate': _rotation,
}

def _blend(degenerate, images, factor):
    # Pillow's Image.blend in float32, then clip and truncate to uint8
    out = degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)
    return out.clamp(0, 255).trunc()

def _grayscale(images):
    # Pillow's RGB -> L conversion; every partial sum is < 2**24, so exact in float32
    r, g, b = images.unbind(1)
    return torch.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536).unsqueeze(1)

def _mean_gray(images, gray):
    # ImageEnhance.Contrast's degenerate: int(mean + 0.5) of the grayscale image, exactly
    n = gray[0].numel()
    return ((2 * gray.sum((1, 2, 3)).long() + n) // (2 * n)).to(images.dtype).view(-1, 1, 1, 1)

def _smooth(images, gray):
    # ImageFilter.SMOOTH, whose border pixels stay the original ones
    kernel = torch.ones(3, 1, 3, 3, device=images.device)  # ones and a fill: no host-to-device copy
    kernel[:, :, 1, 1] = 5
    smooth = torch.floor((F.conv2d(images, kernel, groups=3) + 6.5) / 13)  # round half up
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return degenerate

DEGENERATE = {  # images, their grayscale (B, 1, H, W) -> what ImageEnhance blends away from
    'Brightness': lambda images, gray: torch.zeros_like(gray),
    'Color': lambda images, gray: gray,
    'Contrast': _mean_gray,
    'Sharpness': _smooth,
}

def posterize(images, bits):
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1)
    return torch.floor(images / step) * step

def solarize(images, threshold):
    return torch.where(images < threshold.view(-1, 1, 1, 1), images, 255 - images)

def autocontrast(images, _=None):
    # Pillow's per-channel LUT int(x * scale + offset), computed in float64 like Python
    lo = images.amin((2, 3), keepdim=True).double()
    hi = images.amax((2, 3), keepdim=True).double()
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)  # 255.0 / t would use 1/t, off by an ulp
    out = (images.double() * scale + -lo * scale).trunc().clamp(0, 255).to(images.dtype)
    return torch.where(hi > lo, out, images)

def equalize(images, _=None):
    # ImageOps.equalize's integer LUT per image and channel, from batched histograms
    B, C, H, W = images.shape
    x = images.long().view(B * C, H * W)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=images.device).scatter_add_(1, x, torch.ones_like(x))
    bins = torch.arange(256, device=images.device)
    last = (bins * (hist > 0)).amax(1, keepdim=True)
    step = (x.shape[1] - hist.gather(1, last)) // 255
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, bins)
    return lut.gather(1, x).view(B, C, H, W).to(images.dtype)

def _geometric(name):
    return lambda images, m, interpolation='nearest': _affine(
        images, AFFINE[name](m.double(), *images.shape[-2:]), interpolation)

def _enhancement(name):
    return lambda images, m: _blend(DEGENERATE[name](images, _grayscale(images)), images, 1 + m)

OPS = {  # in the order torchvision draws from
    'Identity': lambda images, _=None: images,
    **{name: _geometric(name) for name in AFFINE},
    **{name: _enhancement(name) for name in DEGENERATE},
    'Posterize': posterize, 'Solarize': solarize, 'AutoContrast': autocontrast, 'Equalize': equalize,
}
SIGNED = {'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color', 'Contrast', 'Sharpness'}

def op_magnitudes(magnitude, height, width, num_bins=31):
    """Unsigned magnitude of each op at bin `magnitude`, as torchvision's _augmentation_space
    (in plain Python, not torch.linspace, so torch.compile sees constants, not .item())."""
    lin = lambda start, end: start + (end - start) * magnitude / (num_bins - 1)
    return {
        'Identity': 0.0, 'ShearX': lin(0.0, 0.3), 'ShearY': lin(0.0, 0.3),
        'TranslateX': lin(0.0, 150.0 / 331.0 * width), 'TranslateY': lin(0.0, 150.0 / 331.0 * height),
        'Rotate': lin(0.0, 30.0), 'Brightness': lin(0.0, 0.9), 'Color': lin(0.0, 0.9),
        'Contrast': lin(0.0, 0.9), 'Sharpness': lin(0.0, 0.9),
        'Posterize': float(8 - round(magnitude / ((num_bins - 1) / 4))),  # round half to even, as torch
        'Solarize': lin(255.0, 0.0), 'AutoContrast': 0.0, 'Equalize': 0.0,
    }

def rand_augment_draws(B, num_ops=2, device="cpu"):
    """Each image's op (an index into OPS) and sign (True: negative) in each of num_ops layers."""
    return [(torch.randint(len(OPS), (B,), device=device), torch.rand(B, device=device) < 0.5)
            for _ in range(num_ops)]


def rand_augment(images, draws, magnitude=9, num_bins=31, interpolation="nearest"):
    """torchvision RandAugment(interpolation=NEAREST or BICUBIC): one layer per draw of
    rand_augment_draws, each image its own op."""
    _check_interpolation(interpolation)
    B, _, H, W = images.shape
    mags = op_magnitudes(magnitude, H, W, num_bins)
    for op_index, negative in draws:
        sign = torch.where(negative, -1.0, 1.0)
        m = {name: sign * mags[name] if name in SIGNED else torch.full((B,), mags[name], device=images.device)
             for name in OPS}
        drew = {name: op_index == k for k, name in enumerate(OPS)}  # (B,) each
        # one resampling for the geometric ops, each image with its own op's matrix (identity if none)
        matrix = _matrix(sign.double(), 1, 0, 0, 0, 1, 0)  # identities, (B, 6): sign lends its batch size and device
        for name, op_matrix in AFFINE.items():
            matrix = torch.where(drew[name].view(B, 1), op_matrix(m[name].double(), H, W), matrix)
        # one blend for the enhancements, each image towards its own op's degenerate image
        gray = _grayscale(images)
        degenerate, factor = images, torch.ones_like(sign)
        for name, op_degenerate in DEGENERATE.items():
            degenerate = torch.where(drew[name].view(B, 1, 1, 1), op_degenerate(images, gray), degenerate)
            factor = torch.where(drew[name], 1 + m[name], factor)
        families = [(AFFINE, _affine(images, matrix, interpolation)), (DEGENERATE, _blend(degenerate, images, factor))]
        families += [((name,), OPS[name](images, m[name])) for name in OPS
                     if name != 'Identity' and name not in AFFINE and name not in DEGENERATE]
        out = images  # Identity
        for names, result in families:
            chosen = torch.stack([drew[name] for name in names]).any(0)
            out = torch.where(chosen.view(B, 1, 1, 1), result, out)
        images = out
    return images

# ---------------------------------------------------------------------------------

def erasing_draws(shape, device="cpu", min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
    """For images of shape (B, C, H, W): `attempts` (area fraction, log aspect) tries per image, the
    coin, top and left as fractions of the free range, and the noise that fills the box."""
    B = shape[0]
    area = torch.empty(B, attempts, device=device).uniform_(min_area, max_area)
    log_ratio = torch.empty(B, attempts, device=device).uniform_(math.log(min_aspect), -math.log(min_aspect))
    coin, top, left = (torch.rand(B, device=device) for _ in range(3))
    return area, log_ratio, coin, top, left, torch.randn(shape, device=device)

def random_erasing(images, draws, prob=0.25):
    """timm RandomErasing(prob, mode='pixel', max_count=1) on normalised images."""
    B, C, H, W = images.shape
    area, log_ratio, coin, top, left, noise = draws
    area = area * H * W
    h = torch.sqrt(area * log_ratio.exp()).round().long()
    w = torch.sqrt(area / log_ratio.exp()).round().long()
    fits = (h < H) & (w < W)
    first = fits.long().argmax(1, keepdim=True)  # timm keeps the first attempt that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    erase = (coin < prob) & fits.any(1)
    top = (top * (H - h + 1)).long()  # randint(0, H - h) inclusive
    left = (left * (W - w + 1)).long()
    box = _box_mask(top, top + h, left, left + w, H, W) & erase.view(B, 1, 1, 1)
    return torch.where(box, noise, images)

def _box_mask(y0, y1, x0, x1, H, W):
    # (B,1,H,W) mask of the rows [y0, y1) and columns [x0, x1) of each image
    rows = torch.arange(H, device=y0.device).view(1, H, 1)
    cols = torch.arange(W, device=y0.device).view(1, 1, W)
    v = lambda t: t.view(-1, 1, 1)
    return ((rows >= v(y0)) & (rows < v(y1)) & (cols >= v(x0)) & (cols < v(x1))).unsqueeze(1)

MIXUP_MODES = ('batch', 'elem')

def mixup_draws(B, H, W, device="cpu", mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch"):
    """timm Mixup's random numbers for B images of H x W: whether each cuts (else mixes), its
    lambda, and the centre of its box, each (B,). mode 'elem': one draw per image; mode 'batch'
    (timm's default): the draw for one image, repeated for all B. The RNG order, n = B or 1 each:
    the cut-or-mix coins, the cutmix lambdas, the mixup lambdas (both drawn, one kept), the box
    rows, the box columns."""
    if mode not in MIXUP_MODES:
        raise ValueError(f"mixup_mode must be one of {MIXUP_MODES}, got {mode!r}")
    n = B if mode == 'elem' else 1
    def beta(alpha):  # validate_args would sync with the host
        concentration = torch.full((n,), float(alpha), device=device)
        return torch.distributions.Beta(concentration, concentration, validate_args=False).sample()
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = torch.rand(n, device=device) < switch_prob
        lam = torch.where(use_cutmix, beta(cutmix_alpha), beta(mixup_alpha))
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = torch.full((n,), cutmix_alpha > 0, device=device)
        lam = beta(max(mixup_alpha, cutmix_alpha))
    else:
        use_cutmix, lam = torch.zeros(n, dtype=torch.bool, device=device), torch.ones(n, device=device)
    draws = use_cutmix, lam, torch.randint(0, H, (n,), device=device), torch.randint(0, W, (n,), device=device)
    return tuple(v.expand(B).contiguous() for v in draws)  # so mixup_cutmix is the same for both modes

def mixup_cutmix(images, labels, num_classes, draws, label_smoothing=0.1):
    """timm Mixup(correct_lam=True), mode 'elem' or 'batch' as mixup_draws drew: image i mixes
    with image B-1-i. Returns (mixed images, soft targets (B, num_classes))."""
    B, _, H, W = images.shape
    use_cutmix, lam, cy, cx = draws
    # timm's rand_bbox: half-sides cut // 2 around a uniform centre, clipped to the image
    ratio = torch.sqrt(1 - lam)
    half_h, half_w = (H * ratio).long() // 2, (W * ratio).long() // 2
    y0, y1 = (cy - half_h).clamp(0, H), (cy + half_h).clamp(0, H)
    x0, x1 = (cx - half_w).clamp(0, W), (cx + half_w).clamp(0, W)
    lam_cut = 1 - ((y1 - y0) * (x1 - x0)).to(lam.dtype) / (H * W)  # the area actually kept
    lam = torch.where(use_cutmix, lam_cut, lam)
    partner = images.flip(0)
    pasted = torch.where(_box_mask(y0, y1, x0, x1, H, W), partner, images)
    lam4 = lam.view(B, 1, 1, 1).to(images.dtype)
    mixed = torch.where(use_cutmix.view(B, 1, 1, 1), pasted, images * lam4 + partner * (1 - lam4))
    off = label_smoothing / num_classes
    onehot = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + off
    targets = lam.view(B, 1) * onehot + (1 - lam.view(B, 1)) * onehot.flip(0)
    return mixed, targets
