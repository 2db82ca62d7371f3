"""
Fine-tuning augmentation on whole batches, on the images' device.

Pipeline order in the fine-tuning step (data.py has already cropped + flipped):
  1. rand_augment(images, draws)            float (B,3,H,W), integer values 0..255
  2. the caller normalises with the ImageNet mean/std
  3. random_erasing(images, draws)          on normalised images, as timm's RandomErasing
  4. mixup_cutmix(images, labels, C, draws) timm's Mixup, mode 'elem', with smoothed soft targets

Every image gets its own random draw, all from torch's global RNG on the images'
device (the training loop re-seeds it each iteration for exact resume). Each step
has its *_draws function, which draws every random number it needs, and the step
itself draws nothing: torch.compile would draw other numbers than eager mode (and
in another order), so only the draw-free work is compiled. Shapes are static and
nothing syncs with the host: every candidate is computed for the whole batch and
each image picks its own with torch.where, so this can run under torch.compile /
CUDA graphs.

RandAugment is torchvision's RandAugment(num_ops, magnitude, num_magnitude_bins=31)
on PIL images, i.e. Pillow's own operations, which OPS reproduces exactly. (The official
MAE recipe uses timm's 'rand-m9-mstd0.5-inc1', a variant with noisy magnitudes.)
"""
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------
# the 14 RandAugment operations, each op(images, magnitude) with magnitude (B,) in
# the op's own units; images are float, integer-valued in [0, 255], as a uint8 PIL image.
# Five are one resampling with their own affine matrix (AFFINE) and four are one blend
# towards their own degenerate image (DEGENERATE): rand_augment runs each family once,
# every image with its own matrix or degenerate image, instead of once per op.

def _affine(images, matrix):
    # Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=0), matrix (B, 6) float64. For any
    # image smaller than 32768 px, Pillow takes its 16.16 fixed-point path, reproduced here bit for
    # bit: output (x, y) reads input (a(x+.5) + b(y+.5) + c, d(x+.5) + e(y+.5) + f)
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

def _matrix(like, *entries):
    # (B, 6) float64 affine matrices from numbers and (B,) tensors; float64 like Pillow, so the
    # fixed-point coefficients round as they do there. Fills, not torch.tensor: no host-to-device copy
    return torch.stack([e if isinstance(e, torch.Tensor) else torch.full_like(like, e) for e in entries], 1)

def _rotation(degrees, H, W):
    # Image.rotate(degrees, NEAREST, expand=False, fillcolor=0): counter-clockwise about
    # (W/2, H/2), Pillow's inverse matrix
    angle = -torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = W / 2, H / 2
    return _matrix(degrees, cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)

AFFINE = {  # (B,) float64 magnitudes, H, W -> (B, 6) matrices, as torchvision builds them
    'ShearX': lambda m, H, W: _matrix(m, 1, m, 0, 0, 1, 0),  # affine(shear=[degrees(atan(m)), 0], center=[0, 0])
    'ShearY': lambda m, H, W: _matrix(m, 1, 0, 0, m, 1, 0),
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
    return lambda images, m: _affine(images, AFFINE[name](m.double(), *images.shape[-2:]))

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

def rand_augment(images, draws, magnitude=9, num_bins=31):
    """torchvision RandAugment: one layer per draw of rand_augment_draws, each image its own op."""
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
        families = [(AFFINE, _affine(images, matrix)), (DEGENERATE, _blend(degenerate, images, factor))]
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

def mixup_draws(B, H, W, device="cpu", mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5):
    """timm Mixup's random numbers for B images of H x W: whether each cuts (else mixes), its
    lambda, and the centre of its box."""
    def beta(alpha):  # validate_args would sync with the host
        concentration = torch.full((B,), float(alpha), device=device)
        return torch.distributions.Beta(concentration, concentration, validate_args=False).sample()
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = torch.rand(B, device=device) < switch_prob
        lam = torch.where(use_cutmix, beta(cutmix_alpha), beta(mixup_alpha))
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = torch.full((B,), cutmix_alpha > 0, device=device)
        lam = beta(max(mixup_alpha, cutmix_alpha))
    else:
        use_cutmix, lam = torch.zeros(B, dtype=torch.bool, device=device), torch.ones(B, device=device)
    return use_cutmix, lam, torch.randint(0, H, (B,), device=device), torch.randint(0, W, (B,), device=device)

def mixup_cutmix(images, labels, num_classes, draws, label_smoothing=0.1):
    """timm Mixup(mode='elem', correct_lam=True): image i mixes with image B-1-i.
    Returns (mixed images, soft targets (B, num_classes))."""
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
