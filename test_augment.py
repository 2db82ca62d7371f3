"""Tests for augment.py: each RandAugment op against Pillow (what torchvision runs on PIL
images), then the batch-level behaviour of rand_augment, random_erasing and mixup_cutmix."""
import functools
import io
import math
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from augment import (OPS, SIGNED, erasing_draws, mixup_cutmix, mixup_draws, op_magnitudes, rand_augment,
                     rand_augment_draws, random_erasing)

RESAMPLE = {'nearest': Image.NEAREST, 'bicubic': Image.BICUBIC}

ZIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'tiny-imagenet-200.zip')

@functools.cache
def read_real_images(n=8):
    with zipfile.ZipFile(ZIP) as z:  # val_10 is a grayscale JPEG: keep one such image
        names = [f'tiny-imagenet-200/val/images/val_{i}.JPEG' for i in [*range(n - 1), 10]]
        return [Image.open(io.BytesIO(z.read(name))).convert('RGB') for name in names]

def real_images():
    if not os.path.exists(ZIP):
        pytest.skip(f'Tiny ImageNet zip not found at {ZIP}')
    return read_real_images()

def generated_images():
    # non-square so H/W mix-ups show; smooth gradients plus noise plus a flat block
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:56]
    a = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1) + g.integers(0, 40, (40, 56, 3))
    b = g.integers(30, 200, (40, 56, 3))
    b[10:20, 5:30] = 77
    return [Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)) for x in (a, b)]

def tv_inverse_affine(center, angle, translate, shear):
    # torchvision.transforms.functional._get_inverse_affine_matrix with scale 1: the matrix
    # torchvision's F.affine hands to Pillow
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m

def tv_affine(img, resample, **kw):
    w, h = img.size
    kw = {'center': [w * 0.5, h * 0.5], 'angle': 0.0, 'translate': [0, 0], 'shear': [0.0, 0.0], **kw}
    return img.transform(img.size, Image.AFFINE, tv_inverse_affine(**kw), resample, fillcolor=(0, 0, 0))

# torchvision's _apply_op for PIL images, magnitude m as a Python float; the geometric ops
# also take the resampling filter
PIL_OPS = {
    'Identity': lambda img, m: img,
    'ShearX': lambda img, m, r=Image.NEAREST: tv_affine(img, r, shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0]),
    'ShearY': lambda img, m, r=Image.NEAREST: tv_affine(img, r, shear=[0.0, math.degrees(math.atan(m))], center=[0, 0]),
    'TranslateX': lambda img, m, r=Image.NEAREST: tv_affine(img, r, translate=[int(m), 0]),
    'TranslateY': lambda img, m, r=Image.NEAREST: tv_affine(img, r, translate=[0, int(m)]),
    'Rotate': lambda img, m, r=Image.NEAREST: img.rotate(m, r, expand=False, fillcolor=(0, 0, 0)),
    'Brightness': lambda img, m: ImageEnhance.Brightness(img).enhance(1.0 + m),
    'Color': lambda img, m: ImageEnhance.Color(img).enhance(1.0 + m),
    'Contrast': lambda img, m: ImageEnhance.Contrast(img).enhance(1.0 + m),
    'Sharpness': lambda img, m: ImageEnhance.Sharpness(img).enhance(1.0 + m),
    'Posterize': lambda img, m: ImageOps.posterize(img, int(m)),
    'Solarize': lambda img, m: ImageOps.solarize(img, m),
    'AutoContrast': lambda img, m: ImageOps.autocontrast(img),
    'Equalize': lambda img, m: ImageOps.equalize(img),
}
EXACT = {'Identity', 'Posterize', 'Solarize', 'Equalize', 'AutoContrast'}  # AutoContrast: float64 as in Python
GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')

def apply_op(name, images, m, interpolation='nearest'):
    # OPS[name], with the interpolation where the op takes one
    return OPS[name](images, m, interpolation) if name in GEOMETRIC else OPS[name](images, m)

def to_tensor(images):
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]).float()

def test_magnitudes_match_torchvision_table():
    # torchvision's _augmentation_space(31, (40, 56)), which uses float32 torch.linspace
    n, H, W = 31, 40, 56
    tv = {'ShearX': torch.linspace(0.0, 0.3, n), 'ShearY': torch.linspace(0.0, 0.3, n),
          'TranslateX': torch.linspace(0.0, 150.0 / 331.0 * W, n),
          'TranslateY': torch.linspace(0.0, 150.0 / 331.0 * H, n), 'Rotate': torch.linspace(0.0, 30.0, n),
          'Brightness': torch.linspace(0.0, 0.9, n), 'Color': torch.linspace(0.0, 0.9, n),
          'Contrast': torch.linspace(0.0, 0.9, n), 'Sharpness': torch.linspace(0.0, 0.9, n),
          'Solarize': torch.linspace(255.0, 0.0, n), 'Posterize': 8 - (torch.arange(n) / ((n - 1) / 4)).round().int()}
    for b in range(n):
        ours = op_magnitudes(b, H, W)
        assert set(ours) - set(tv) == {'Identity', 'AutoContrast', 'Equalize'}  # the three without a magnitude
        for name, values in tv.items():
            assert np.float32(ours[name]) == pytest.approx(values[b].item(), rel=1e-6, abs=1e-6), (name, b)
        # where an integer boundary matters (thresholds, bit counts, whole pixels) agree exactly
        assert ours['Solarize'] == tv['Solarize'][b].item() and ours['Posterize'] == tv['Posterize'][b].item()
        assert int(ours['TranslateX']) == int(tv['TranslateX'][b].item())
        assert int(ours['TranslateY']) == int(tv['TranslateY'][b].item())
    assert op_magnitudes(9, 64, 64)['Posterize'] == 7

def op_magnitude_list(name, height, width):
    # several bins of the 31, both signs where signed, plus off-grid values
    bins = [0, 5, 9, 17, 30]
    mags = [op_magnitudes(b, height, width)[name] for b in bins]
    if name in SIGNED:
        mags += [-v for v in mags[1:]]
    # right angles (Pillow transposes), and shears where torchvision's tan(atan(m)) != m shows
    extra = {'Rotate': [0.5, -45.0, 90.0, -90.0, 180.0, 270.0], 'TranslateX': [-0.7, 3.9], 'TranslateY': [-0.7, 3.9],
             'ShearX': [0.5, -0.17, 1.0, -0.75], 'ShearY': [0.5, -0.17, -1.0, 0.75], 'Posterize': [1.0, 2.0, 3.0],
             'Solarize': [0.0, 127.5, 128.0, 200.3]}
    return [float(np.float32(v)) for v in mags + extra.get(name, [])]

def compare_op(name, images, interpolation='nearest'):
    H, W = images[0].height, images[0].width
    pairs = [(im, m) for m in op_magnitude_list(name, H, W) for im in images]
    pil_op = PIL_OPS[name] if name not in GEOMETRIC else functools.partial(PIL_OPS[name], r=RESAMPLE[interpolation])
    ref = to_tensor([pil_op(im, m) for im, m in pairs])
    # one batch, each image with its own magnitude
    out = apply_op(name, to_tensor([im for im, _ in pairs]), torch.tensor([m for _, m in pairs]), interpolation)
    assert out.shape == ref.shape and out.dtype == torch.float32
    diff = (out - ref).abs()
    max_diff, frac = diff.max().item(), (diff > 0).float().mean().item()
    print(f'{name:13s} {interpolation:8s} max |diff| {max_diff:5.1f}  differing values {frac:.5%}')
    if name in EXACT or name in GEOMETRIC:
        # geometric: torchvision's and Pillow's float64 matrix and Pillow's sampling (16.16 fixed
        # point, or bicubic in float64), in the same order of operations. Bicubic would see an
        # FMA-contracting build of Pillow (arm64) only where a value truncates at an integer
        assert max_diff == 0, (name, interpolation)
    else:
        # exact here; a compiler contracting Pillow's float32 blend into an FMA (e.g. on
        # arm64) may flip a rare truncation by 1, but a real bug changes many values
        assert max_diff <= 1 and frac < 0.001, name
    return max_diff

@pytest.mark.parametrize('name', OPS)
def test_op_matches_pillow_real_images(name):
    compare_op(name, real_images())

@pytest.mark.parametrize('name', OPS)
def test_op_matches_pillow_generated_images(name):
    compare_op(name, generated_images())

@pytest.mark.parametrize('name', GEOMETRIC)
def test_geometric_op_matches_pillow_bicubic(name):
    # Image.transform / Image.rotate with BICUBIC, on the real and the non-square generated images
    compare_op(name, real_images(), 'bicubic')
    compare_op(name, generated_images(), 'bicubic')

def test_interpolation_setting_is_checked():
    x = to_tensor(generated_images())
    with pytest.raises(ValueError, match='rand_augment_interpolation'):
        rand_augment(x, rand_augment_draws(len(x)), interpolation='bilinear')
    with pytest.raises(ValueError, match='rand_augment_interpolation'):
        OPS['Rotate'](x, torch.ones(len(x)), 'BICUBIC')

def test_op_table_names():
    assert tuple(OPS) == ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
                          'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')

# ---------------------------------------------------------------------------------

def test_rand_augment_shape_range_and_identity():
    torch.manual_seed(0)
    x = to_tensor(generated_images() * 8)
    out = rand_augment(x, rand_augment_draws(len(x), num_ops=2), magnitude=9)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())
    assert not torch.equal(out, x)
    assert torch.equal(rand_augment(x, rand_augment_draws(len(x), num_ops=0)), x)
    torch.manual_seed(1)
    a = rand_augment(x, rand_augment_draws(len(x)))
    torch.manual_seed(1)
    assert torch.equal(rand_augment(x, rand_augment_draws(len(x))), a)  # the global RNG alone decides: resumable

def test_rand_augment_layers_draw_independently():
    # torchvision picks each layer's op afresh: two layers agree on an image's op 1 time in 14
    torch.manual_seed(0)
    (ops_a, neg_a), (ops_b, neg_b) = rand_augment_draws(14_000, num_ops=2)
    assert abs((ops_a == ops_b).float().mean().item() - 1 / 14) < 0.01
    assert abs((neg_a == neg_b).float().mean().item() - 1 / 2) < 0.02


@pytest.mark.parametrize('interpolation', ['nearest', 'bicubic'])
def test_rand_augment_applies_each_images_op(interpolation):
    # two layers on a batch: each image equals its drawn ops applied to it alone, in order
    torch.manual_seed(0)
    x = to_tensor(generated_images() * 32)
    B, names = len(x), list(OPS)
    draws = rand_augment_draws(B, num_ops=2)
    out = rand_augment(x, draws, magnitude=9, interpolation=interpolation)
    mags = op_magnitudes(9, *x.shape[-2:])
    for i in range(B):
        img = x[i:i + 1]
        for op_index, negative in draws:
            name = names[op_index[i]]
            m = torch.tensor([-mags[name] if name in SIGNED and negative[i] else mags[name]])  # float32, as in rand_augment
            img = apply_op(name, img, m, interpolation)
        assert torch.equal(out[i], img[0]), (i, [names[k[i]] for k, _ in draws])
    assert len({names[k] for op_index, _ in draws for k in op_index.tolist()}) == len(OPS)  # every op ran

def test_rand_augment_draws_each_op_per_image():
    # many copies of one image, one layer: identify the op (and sign) each copy got from
    # its output; every op has a distinct output on this image (the draws do not depend on
    # the interpolation: test_rand_augment_applies_each_images_op covers bicubic)
    img = to_tensor(generated_images()[:1])
    B = 1400
    mags = op_magnitudes(9, *img.shape[-2:])
    candidates = []
    for name in OPS:
        for s in ([1.0, -1.0] if name in SIGNED else [1.0]):
            candidates.append((name, s, OPS[name](img, torch.tensor([s * mags[name]]))[0]))
    outs = torch.stack([c for *_, c in candidates])
    assert all((outs[i] != outs[j]).any() for i in range(len(outs)) for j in range(i))
    torch.manual_seed(0)
    out = rand_augment(img.expand(B, -1, -1, -1).contiguous(), rand_augment_draws(B, num_ops=1), magnitude=9)
    match = (out[:, None] == outs[None]).flatten(2).all(2)  # (B, candidates)
    assert torch.equal(match.sum(1), torch.ones(B, dtype=torch.long))
    which = match.float().argmax(1)
    counts = {n: 0 for n in OPS}
    negative = signed = 0
    for i in which.tolist():
        name, s, _ = candidates[i]
        counts[name] += 1
        if name in SIGNED:
            signed += 1
            negative += s < 0
    assert all(abs(c - B / 14) < 40 for c in counts.values()), counts  # 100 +- 4 sigma
    assert abs(negative / signed - 0.5) < 0.07

# ---------------------------------------------------------------------------------

def test_random_erasing():
    torch.manual_seed(0)
    B, H, W = 2000, 32, 48
    x = torch.full((B, 3, H, W), 7.0)
    out = random_erasing(x, erasing_draws(x.shape), prob=0.25)
    changed = out != x
    assert torch.equal(changed.all(1), changed.any(1))  # all channels of a pixel or none
    touched = changed.flatten(1).any(1)
    assert abs(touched.float().mean().item() - 0.25) < 0.04
    fractions, tops, bottoms = [], [], []
    for i in touched.nonzero().flatten().tolist():
        m = changed[i, 0]
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert m.sum() == h * w  # one filled rectangle; everything else untouched
        assert h < H and w < W
        # h, w are rounded sqrt(area * ratio), sqrt(area / ratio)
        assert (h + 0.5) * (w + 0.5) >= 0.02 * H * W and (h - 0.5) * (w - 0.5) <= H * W / 3
        assert 0.3 * (w - 0.5) <= h + 0.5 and h - 0.5 <= (w + 0.5) / 0.3
        fractions.append((h * w).item() / (H * W))
        tops.append(rows[0].item())
        bottoms.append(rows[-1].item() + 1)
    assert min(fractions) < 0.04 and max(fractions) > 0.28
    assert min(tops) == 0 and max(bottoms) == H  # the whole range of positions is used
    noise = out[changed]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    assert torch.equal(random_erasing(x, erasing_draws(x.shape), prob=0.0), x)

# ---------------------------------------------------------------------------------

def mix(x, y, num_classes, label_smoothing=0.1, **draw_args):
    return mixup_cutmix(x, y, num_classes, mixup_draws(len(x), *x.shape[2:], **draw_args), label_smoothing)

def constant_batch(B, H=16, W=24):
    # image i is the constant i, so every output pixel names its source image
    return torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()

def partner_weight(targets, labels, smoothing=0.1, num_classes=50):
    off = smoothing / num_classes
    on = 1 - smoothing + off
    return (targets.gather(1, labels.flip(0)[:, None]).squeeze(1) - off) / (on - off)

def test_cutmix_weight_is_pasted_fraction():
    torch.manual_seed(0)
    B = 64
    x, y = constant_batch(B), torch.arange(B) % 50
    assert (y != y.flip(0)).all()
    out, t = mix(x, y, 50, mixup_alpha=0.0, cutmix_alpha=1.0, mode='elem')
    assert torch.allclose(t.sum(1), torch.ones(B))
    src = torch.arange(B).view(B, 1, 1, 1).float()
    from_self, from_partner = out == src, out == src.flip(0)
    assert (from_self | from_partner).all()
    frac = from_partner.flatten(1).float().mean(1)
    assert torch.allclose(partner_weight(t, y), frac, atol=1e-6)
    assert frac.std() > 0.1  # lam varies per image

def test_cutmix_box_sizes_match_timm():
    # timm's rand_bbox in numpy: cut = int(side * sqrt(1 - lam)), half-sides cut // 2
    # around a uniform centre, clipped; compare the mean pasted fraction
    B, H, W = 4000, 16, 24
    g = np.random.default_rng(0)
    ratio = np.sqrt(1 - g.beta(1.0, 1.0, B))
    cut_h, cut_w = (H * ratio).astype(int), (W * ratio).astype(int)
    cy, cx = g.integers(0, H, B), g.integers(0, W, B)
    hh = np.clip(cy + cut_h // 2, 0, H) - np.clip(cy - cut_h // 2, 0, H)
    ww = np.clip(cx + cut_w // 2, 0, W) - np.clip(cx - cut_w // 2, 0, W)
    expected = (hh * ww / (H * W)).mean()
    torch.manual_seed(0)
    out, _ = mix(constant_batch(B, H, W), torch.zeros(B, dtype=torch.long), 10, mixup_alpha=0.0, mode='elem')
    src = torch.arange(B).view(B, 1, 1, 1).float()
    pasted = (out != src).flatten(1).float().mean(1)
    assert abs(pasted.mean().item() - expected) < 0.02, (pasted.mean().item(), expected)

def test_mixup_is_linear_blend():
    torch.manual_seed(0)
    B = 20000  # enough draws to tell Beta(0.8, 0.8) from the uniform (variance 0.0962 against 0.0833)
    x = torch.rand(B, 3, 4, 6) * 255
    y = (torch.arange(B) * 7) % 50
    assert (y != y.flip(0)).all()
    out, t = mix(x, y, 50, mixup_alpha=0.8, cutmix_alpha=0.0, mode='elem')
    assert torch.allclose(t.sum(1), torch.ones(B))
    lam = 1 - partner_weight(t, y).view(B, 1, 1, 1)
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-3)
    assert abs(lam.var().item() - 1 / (4 * (2 * 0.8 + 1))) < 0.004  # Beta(0.8, 0.8)

def test_mixup_cutmix_switch():
    torch.manual_seed(0)
    B = 400
    x, y = constant_batch(B), torch.arange(B) % 50
    out, t = mix(x, y, 50, mode='elem')
    assert torch.allclose(t.sum(1), torch.ones(B))
    src = torch.arange(B).view(B, 1, 1, 1).float()
    # cutmix pixels come whole from one image or its partner; mixup pixels are blends
    pure = ((out == src) | (out == src.flip(0))).flatten(1).all(1)
    assert abs(pure.float().mean().item() - 0.5) < 0.1

def test_mixup_batch_mode_one_draw_for_the_batch():
    # timm's mode 'batch': one coin, lambda and box centre, the draw mode 'elem' makes for one image
    B, H, W = 64, 16, 24
    torch.manual_seed(3)
    one = mixup_draws(1, H, W, mode='elem')
    torch.manual_seed(3)
    draws = mixup_draws(B, H, W, mode='batch')
    for d, o in zip(draws, one):
        assert d.shape == (B,) and torch.equal(d, o.expand(B))
    x, y = constant_batch(B, H, W), torch.arange(B) % 50
    src = torch.arange(B).view(B, 1, 1, 1).float()
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        draws = mixup_draws(B, H, W, mode='batch')
        use_cutmix, lam = draws[:2]
        out, t = mixup_cutmix(x, y, 50, draws)
        assert torch.allclose(t.sum(1), torch.ones(B))
        w = partner_weight(t, y)
        assert torch.allclose(w, w[0].expand(B), atol=1e-6)  # one lambda for the batch
        if use_cutmix[0]:
            # one box: every image takes the same pixels from its partner, weighted by their area
            from_partner = (out == src.flip(0)) & (out != src)
            assert (from_partner | (out == src)).all() and (from_partner == from_partner[:1]).all()
            assert torch.allclose(w, from_partner.flatten(1).float().mean(1), atol=1e-6)
        else:
            lam4 = lam.view(B, 1, 1, 1)
            assert torch.allclose(out, lam4 * x + (1 - lam4) * x.flip(0), atol=1e-4)
            assert torch.allclose(w, 1 - lam, atol=1e-6)
        kinds.add(bool(use_cutmix[0]))
    assert kinds == {True, False}
    with pytest.raises(ValueError, match='mixup_mode'):
        mixup_draws(B, H, W, mode='pair')

def test_label_smoothing_only():
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 3, 9, 3, 1])
    out, t = mix(x, y, 10, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    assert torch.equal(out, x)
    expected = torch.full((5, 10), 0.01)
    expected[torch.arange(5), y] = 0.91
    assert torch.allclose(t, expected)

if __name__ == '__main__':
    import sys
    sys.exit(pytest.main([__file__, '-q']))
