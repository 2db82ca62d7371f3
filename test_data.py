"""
Tests of data.py's batched augmentation against Pillow's own image operations and against the
properties torchvision's RandomResizedCrop promises. Run with `python test_data.py` or pytest.
"""
import io
import json
import math
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

ZIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "tiny-imagenet-200.zip")


def sample_images(n=8):
    """Real Tiny ImageNet validation images when the archive is there, else smooth generated ones."""
    if os.path.exists(ZIP):
        with zipfile.ZipFile(ZIP) as z:
            return np.stack([np.asarray(Image.open(io.BytesIO(z.read(f"tiny-imagenet-200/val/images/val_{i}.JPEG")))
                                        .convert("RGB")) for i in range(n)])
    yy, xx = np.mgrid[0:64, 0:64] / 64
    wave = lambda phase: 127.5 + 127 * np.sin(2 * np.pi * phase)
    return np.stack([np.stack([wave(xx * (1 + i % 3) + yy / 2), wave(yy * (1 + i % 2) - xx * 0.3 + 0.25),
                               wave((xx + yy) * (0.5 + i / 8))], -1) for i in range(n)]).round().astype(np.uint8)


def pillow_crop(img, top, left, h, w, flip, size):
    out = Image.fromarray(img).crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).float()


@pytest.mark.parametrize("source", ["real", "noise"])
def test_resized_crop_flip_equals_pillow(source):
    # 64 images, each its own box, from tiny slivers to the whole image: equal to Pillow's crop + resize
    # bit for bit (float64 products of pixels and Pillow's fixed-point weights are exact)
    n = 64
    torch.manual_seed(0)
    images = sample_images(n) if source == "real" else np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), np.uint8)
    top, left, h, w = data.crop_boxes(data.crop_flip_draws(n, (0.005, 1.0)), 64, 64)
    flip = torch.arange(n) % 2 == 0
    ours = data.resized_crop(data.to_float(torch.from_numpy(images)), top, left, h, w, flip, 64)
    ref = torch.stack([pillow_crop(images[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), bool(flip[i]), 64)
                       for i in range(n)])
    print(f"crop vs Pillow ({source}): largest difference {(ours - ref).abs().max().item()}, "
          f"{(ours != ref).float().mean().item():.2%} of values differ")
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)


def test_full_box_without_flip_is_identity():
    images = torch.from_numpy(sample_images(2))
    full = torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([64, 64]), torch.tensor([64, 64])
    out = data.resized_crop(data.to_float(images), *full, torch.tensor([False, True]), 64)
    assert torch.equal(out[0], data.to_float(images)[0])
    assert torch.equal(out[1], data.to_float(images)[1].flip(2))


def torchvision_get_params(rng, H, W, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params written out as torchvision does it: one attempt after another."""
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    return (H - H) // 2, (W - W) // 2, H, W  # a square image falls back to the whole image


def test_crop_boxes_follow_random_resized_crop():
    torch.manual_seed(0)
    n = 20000
    top, left, h, w = data.crop_boxes(data.crop_flip_draws(n, (0.2, 1.0)), 64, 64)
    assert torch.all((top >= 0) & (left >= 0) & (top + h <= 64) & (left + w <= 64) & (h > 0) & (w > 0))
    import random
    rng = random.Random(0)
    ref = torch.tensor([torchvision_get_params(rng, 64, 64, (0.2, 1.0)) for _ in range(n)], dtype=torch.float32)
    ours = torch.stack([top, left, h, w], 1).float()
    # the same distribution: means and spreads of (top, left, h, w), and of area and aspect ratio,
    # agree within a few standard errors of 20,000 draws
    for name, a, b in [("box", ours, ref), ("area", ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]),
                       ("aspect", ours[:, 3] / ours[:, 2], ref[:, 3] / ref[:, 2])]:
        se = b.std(0) / math.sqrt(n) * math.sqrt(2)
        assert torch.all((a.mean(0) - b.mean(0)).abs() < 5 * se), name
        assert torch.all((a.std(0) / b.std(0) - 1).abs() < 0.05), name
    assert (ours[:, 2] * ours[:, 3]).min() >= 0.2 * 4096 * 0.9  # rounding of w and h widens the range slightly
    # each image draws its own box
    assert len(set(map(tuple, ours[:100].tolist()))) > 90


def test_crop_flip_mirrors_about_half():
    # full-area crops: each output is the image itself or its mirror, and about half are mirrored
    torch.manual_seed(0)
    x = data.to_float(torch.from_numpy(sample_images(1))).expand(2000, -1, -1, -1)
    out = data.resized_crop_flip(x, data.crop_flip_draws(2000, (1.0, 1.0)))
    mirrored = torch.all((out == x.flip(3)).flatten(1), dim=1)
    same = torch.all((out == x).flatten(1), dim=1)
    assert torch.all(mirrored ^ same)
    assert 0.45 < mirrored.float().mean() < 0.55


@pytest.mark.parametrize("size, offset", [(73, 4), (75, 6)])  # torchvision's int(round(4.5)), int(round(5.5))
def test_resize_centre_crop_equals_pillow(size, offset):
    images = sample_images(64)
    ours = data.resize_centre_crop(data.to_float(torch.from_numpy(images)), size, 64)
    box = (offset, offset, offset + 64, offset + 64)
    ref = torch.stack([torch.from_numpy(np.array(Image.fromarray(img).resize((size, size), Image.BICUBIC).crop(box)))
                       .permute(2, 0, 1).float() for img in images])
    assert torch.equal(ours, ref), f"largest difference {(ours - ref).abs().max().item()}"


def test_normalize_is_imagenet_statistics():
    x = torch.rand(2, 3, 5, 5) * 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # torchvision's, R G B
    expected = (x / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(data.normalize(x), expected, atol=1e-5)


def test_permutation_is_fresh_each_epoch_and_repeatable():
    a, b = data.permutation(1000, 0, 0, "cpu"), data.permutation(1000, 0, 1, "cpu")
    assert torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, b)
    assert torch.equal(a, data.permutation(1000, 0, 0, "cpu"))
    assert not math.isclose(a[:10].float().mean().item(), data.permutation(1000, 1, 0, "cpu")[:10].float().mean().item())


def test_load_split_errors_name_the_file(tmp_path):
    with pytest.raises(SystemExit, match="train_images.npy not found"):
        data.load_split(str(tmp_path), "train", "cpu")


def bad_pack(folder, case):
    """A packed 4-class set of eight 8x8 images with one thing wrong; returns the file it is in."""
    os.makedirs(folder)
    images, labels = np.zeros((8, 8, 8, 3), np.uint8), np.arange(8) % 4
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"classes": ["a", "b", "c", "d"]}, f)
    bad = {"empty_file": ("images", None), "npz_archive": ("images", None), "object_labels": ("labels", None),
           "float_labels": ("labels", labels * 0.5), "label_out_of_range": ("labels", labels + 1),
           "negative_label": ("labels", labels - 1), "labels_per_image": ("labels", labels[:7]),
           "not_square": ("images", images[:, :, :4]), "gray_images": ("images", images[..., 0]),
           "other_size": ("images", np.zeros((8, 16, 16, 3), np.uint8))}[case]
    arrays = {"images": images, "labels": labels.astype(">i2")}  # big-endian labels are fine: a good case
    if bad[1] is not None:
        arrays[bad[0]] = bad[1]
    for kind, array in arrays.items():
        np.save(os.path.join(folder, f"train_{kind}.npy"), array)
    path = os.path.join(folder, f"train_{bad[0]}.npy")
    if case == "empty_file":
        open(path, "w").close()
    elif case == "npz_archive":
        with open(path, "wb") as f:
            np.savez(f, images=images)
    elif case == "object_labels":
        np.save(path, np.array(["a"] * 8, dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("case", ["empty_file", "npz_archive", "object_labels", "float_labels", "label_out_of_range",
                                  "negative_label", "labels_per_image", "not_square", "gray_images", "other_size"])
def test_bad_arrays_are_one_line_naming_the_file(tmp_path, case):
    path = bad_pack(str(tmp_path / "d"), case)
    with pytest.raises(SystemExit, match=r"^error: .*" + re.escape(path)):
        data.load_split(str(tmp_path / "d"), "train", "cpu", size=8)


def test_a_good_pack_loads_as_uint8_images_and_int64_labels(tmp_path):
    bad_pack(str(tmp_path / "d"), "other_size")
    images, labels = data.load_split(str(tmp_path / "d"), "train", "cpu")  # any square size, without size=
    assert images.dtype == torch.uint8 and images.shape == (8, 16, 16, 3)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3] * 2


if __name__ == "__main__":
    import sys
    sys.exit(pytest.main([__file__, "-q", "-s"]))
