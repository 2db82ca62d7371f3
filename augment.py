"""
Fine-tuning augmentation on whole batches on the images' device, after data.py's crop + flip: rand_augment
(torchvision's RandAugment, whose Pillow ops OPS reproduces bit for bit), the caller's normalisation,
random_erasing (timm's RandomErasing), mixup_cutmix (timm's Mixup). Each step's *_draws function draws all
its random numbers and the step none, as torch.compile would draw others than eager: only the draw-free
work is compiled. Shapes are static: each image picks its own result among the batch's with torch.where.
"""
import math

import torch
import torch.nn.functional as F

# The 14 RandAugment ops, op(images, magnitude (B,) in the op's own units); the five geometric ones also
# take interpolation. Five are one resampling with their own affine matrix (AFFINE), four one blend
# towards their own degenerate image (DEGENERATE): rand_augment runs each family once for all images.

INTERPOLATIONS = ('nearest', 'bicubic')

def _check_interpolation(interpolation):
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"rand_augment_interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")

def _affine(images, matrix, interpolation="nearest"):
    # Image.transform(size, AFFINE, matrix, NEAREST or BICUBIC, fillcolor=0), matrix (B, 6) float64
    _check_interpolation(interpolation)
    return _nearest(images, matrix) if interpolation == 'nearest' else _bicubic(images, matrix)

def _gather(images, index):  # images (B, C, H, W) at flat pixel indices (B, H, W)
    B, C, H, W = images.shape
    return images.reshape(B, C, H * W).gather(2, index.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)

def _nearest(images, matrix):
    # Pillow's 16.16 fixed-point path (images under 32768 px): output (x, y) reads input matrix @ (x+.5, y+.5)
    B, C, H, W = images.shape
    a, b, c, d, e, f = matrix.unbind(1)
    fix = lambda v: torch.floor(v * 65536.0 + 0.5).long().view(B, 1, 1)
    y = torch.arange(H, device=images.device).view(1, H, 1)
    x = torch.arange(W, device=images.device).view(1, 1, W)
    xin = (fix(c + a * 0.5 + b * 0.5) + x * fix(a) + y * fix(b)) >> 16
    yin = (fix(f + d * 0.5 + e * 0.5) + x * fix(d) + y * fix(e)) >> 16
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    out = _gather(images, yin.clamp(0, H - 1) * W + xin.clamp(0, W - 1))
    return torch.where(inside.unsqueeze(1), out, 0.0)

def _cubic(v1, v2, v3, v4, d):
    # Pillow's BICUBIC macro (a = -1) at d in [0, 1) between v2 and v3, in its order of operations
    return v2 + d * ((-v1 + v3) + d * ((2 * (v1 - v2) + v3 - v4) + d * (-v1 + v2 - v3 + v4)))

def _bicubic(images, matrix):
    # Pillow's ImagingGenericTransform with bicubic_filter32RGB, in float64 as there: the 4 x 4 pixels
    # around each sample (edge pixels repeated), clipped and truncated to uint8; 0 outside the image
    B, C, H, W = images.shape
    a, b, c, d, e, f = (v.view(B, 1, 1) for v in matrix.unbind(1))
    y = torch.arange(H, device=images.device, dtype=torch.float64).view(1, H, 1) + 0.5
    x = torch.arange(W, device=images.device, dtype=torch.float64).view(1, 1, W) + 0.5
    xin, yin = a * x + b * y + c, d * x + e * y + f  # (B, H, W)
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xin, yin = xin - 0.5, yin - 0.5  # pixel centres at integers
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)  # (B, 1, H, W)
    # Pillow reads the clamped rows too: it clips the first row and repeats the last one in range
    cols = [(x0.long() + k).clamp(0, W - 1) for k in (-1, 0, 1, 2)]
    rows = [(y0.long() + k).clamp(0, H - 1) * W for k in (-1, 0, 1, 2)]
    v = [_cubic(*(_gather(images, row + col).double() for col in cols), dx) for row in rows]
    out = _cubic(*v, dy).clamp(0, 255).trunc().to(images.dtype)
    return torch.where(inside.unsqueeze(1), out, 0.0)

def _matrix(like, *entries):
    # (B, 6) matrices from numbers and (B,) tensors, in float64 with Pillow's and torchvision's operations
    # (bicubic sampling sees what fixed point rounds away). Fills, not torch.tensor: no host-to-device copy
    return torch.stack([e if isinstance(e, torch.Tensor) else torch.full_like(like, e) for e in entries], 1)

def _rotation(degrees, H, W):
    # Image.rotate(degrees, expand=False, fillcolor=0) about (W/2, H/2): Pillow's inverse matrix from
    # angle % 360, cos and sin rounded to 15 decimals (else cos(90 degrees) = 6e-17 moves every sample)
    angle = -(torch.remainder(degrees, 360.0) * (math.pi / 180))  # math.radians
    round15 = lambda v: torch.round(v * 1e15) / 1e15  # Python's round(v, 15), up to an ulp
    cos, sin = round15(torch.cos(angle)), round15(torch.sin(angle))
    cx, cy = W / 2, H / 2
    return _matrix(degrees, cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)

def _shear(m):
    # ShearX's tan(s) and ShearY's -sin(-s) / cos(s), as torchvision's affine(shear=degrees(atan(m)))
    # computes them: s = radians(degrees(atan(m))), each conversion rounding as math's does
    s = torch.atan(m) * (180 / math.pi) * (math.pi / 180)
    return torch.tan(s), torch.sin(s) / torch.cos(s)

AFFINE = {  # (B,) float64 magnitudes, H, W -> (B, 6) matrices, as torchvision builds them
    'ShearX': lambda m, H, W: _matrix(m, 1, _shear(m)[0], 0, 0, 1, 0),  # center=[0, 0]
    'ShearY': lambda m, H, W: _matrix(m, 1, 0, 0, _shear(m)[1], 1, 0),
    'TranslateX': lambda t, H, W: _matrix(t, 1, 0, -t.trunc(), 0, 1, 0),  # int(magnitude) pixels
    'TranslateY': lambda t, H, W: _matrix(t, 1, 0, 0, 0, 1, -t.trunc()),
    'Rotate': _rotation,
}

def _blend(degenerate, images, factor):
    # Pillow's Image.blend in float32, then clip and truncate to uint8
    return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0, 255).trunc()

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
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = torch.floor((F.conv2d(images, kernel, groups=3) + 6.5) / 13)  # half up
    return degenerate

DEGENERATE = {  # images, their grayscale (B, 1, H, W) -> what ImageEnhance blends away from
    'Brightness': lambda images, gray: torch.zeros_like(gray), 'Color': lambda images, gray: gray,
    'Contrast': _mean_gray, 'Sharpness': _smooth,
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
    hist = x.new_zeros(B * C, 256).scatter_add_(1, x, torch.ones_like(x))
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
SIGNED = {*AFFINE, *DEGENERATE}  # the ops whose magnitude torchvision negates half the time

def op_magnitudes(magnitude, height, width, num_bins=31):
    """Unsigned magnitude of each op at bin `magnitude`, as torchvision's _augmentation_space
    (in plain Python, not torch.linspace, so torch.compile sees constants, not .item())."""
    lin = lambda start, end: start + (end - start) * magnitude / (num_bins - 1)
    return {
        'Identity': 0.0, 'ShearX': lin(0.0, 0.3), 'ShearY': lin(0.0, 0.3),
        'TranslateX': lin(0.0, 150.0 / 331.0 * width), 'TranslateY': lin(0.0, 150.0 / 331.0 * height),
        'Rotate': lin(0.0, 30.0), **dict.fromkeys(DEGENERATE, lin(0.0, 0.9)),
        'Posterize': float(8 - round(magnitude / ((num_bins - 1) / 4))),  # round half to even, as torch
        'Solarize': lin(255.0, 0.0), 'AutoContrast': 0.0, 'Equalize': 0.0,
    }

def rand_augment_draws(B, num_ops=2, device="cpu"):
    """Each image's op (an index into OPS) and sign (True: negative) in each of num_ops layers."""
    return [(torch.randint(len(OPS), (B,), device=device), torch.rand(B, device=device) < 0.5)
            for _ in range(num_ops)]

def rand_augment(images, draws, magnitude=9, num_bins=31, interpolation="nearest"):
    """torchvision RandAugment: one layer per draw of rand_augment_draws, each image its own op."""
    _check_interpolation(interpolation)
    B, _, H, W = images.shape
    mags = op_magnitudes(magnitude, H, W, num_bins)
    for op_index, negative in draws:
        sign = torch.where(negative, -1.0, 1.0)
        m = {name: sign * mags[name] if name in SIGNED else torch.full((B,), mags[name], device=images.device)
             for name in OPS}
        drew = {name: op_index == k for k, name in enumerate(OPS)}  # (B,) each
        picked = lambda names: torch.stack([drew[name] for name in names]).any(0).view(B, 1, 1, 1)
        matrix = _matrix(sign.double(), 1, 0, 0, 0, 1, 0)  # identities (sign lends batch size and device)
        for name, op_matrix in AFFINE.items():  # one resampling, each image its own op's matrix
            matrix = torch.where(drew[name].view(B, 1), op_matrix(m[name].double(), H, W), matrix)
        gray = _grayscale(images)
        degenerate, factor = images, torch.ones_like(sign)
        for name, op_degenerate in DEGENERATE.items():  # one blend, each towards its own op's degenerate
            degenerate = torch.where(drew[name].view(B, 1, 1, 1), op_degenerate(images, gray), degenerate)
            factor = torch.where(drew[name], 1 + m[name], factor)
        out = torch.where(picked(AFFINE), _affine(images, matrix, interpolation), images)  # else Identity
        out = torch.where(picked(DEGENERATE), _blend(degenerate, images, factor), out)
        for name in ('Posterize', 'Solarize', 'AutoContrast', 'Equalize'):
            out = torch.where(picked([name]), OPS[name](images, m[name]), out)
        images = out
    return images

# --------------------------------------------------------------------------------- erasing, mixup
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
    """timm Mixup's random numbers, each (B,), in its RNG order: cut (else mix), lambda (both kinds drawn),
    box centre row and column; one draw per image (mode 'elem') or for all ('batch', timm's default)."""
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
    cy, cx = torch.randint(0, H, (n,), device=device), torch.randint(0, W, (n,), device=device)
    return tuple(v.expand(B).contiguous() for v in (use_cutmix, lam, cy, cx))  # (B,) in both modes

def mixup_cutmix(images, labels, num_classes, draws, label_smoothing=0.1):
    """timm Mixup(correct_lam=True), image i with image B-1-i: (mixed images, soft targets (B, classes))."""
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
    onehot = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + label_smoothing / num_classes
    targets = lam.view(B, 1) * onehot + (1 - lam.view(B, 1)) * onehot.flip(0)
    return mixed, targets
