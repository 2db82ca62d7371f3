"""
The packed Tiny ImageNet arrays (from prepare_tin.py) and the augmentation every stage shares, on whole
batches where the data lives: no per-image Python, no workers. A random resized crop + flip is one
linear map per image: Pillow's bicubic weights, rounded to its fixed point, applied to rows and columns
by two batched float64 matrix products, give Pillow's crop + resize bit for bit.
"""
import json
import math
import os

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the reference normalises
STD = (0.229, 0.224, 0.225)
_REPACK = "pack the data set again with prepare_tin.py"

def load_split(data_dir, split, device, size=None):
    """uint8 images (N, H, W, 3), int64 labels (N,) of 'train' or 'val' on `device`; H = W = size if given."""
    paths = [os.path.join(data_dir, f"{split}_{kind}.npy") for kind in ("images", "labels")]
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found: pack the data set first with "
                             f"'python prepare_tin.py' (data_dir={data_dir!r})")
    images, labels = (read_array(path) for path in paths)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2:] != (images.shape[1], 3):
        raise SystemExit(f"error: {paths[0]} is not a uint8 (N, H, H, 3) array of square RGB images")
    if size is not None and images.shape[1] != size:
        raise SystemExit(f"error: {paths[0]} holds {images.shape[1]}px images, "
                         f"the training images are {size}px")
    classes = num_classes(data_dir)
    if (labels.dtype.kind not in "iu" or labels.shape != images.shape[:1]
            or len(labels) and not 0 <= labels.min() <= labels.max() < classes):
        raise SystemExit(f"error: {paths[1]} is not one integer label in [0, {classes}) "
                         f"per image of {paths[0]}")
    return torch.from_numpy(images).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)

def read_array(path):
    try:
        array = np.load(path)
    except Exception as e:  # cut short, empty, not an .npy file: numpy raises many kinds
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {e}); {_REPACK}")
    if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
        raise SystemExit(f"error: {path} is not an .npy array; {_REPACK}")
    return array

def num_classes(data_dir):
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path) as f:
            return len(json.load(f)["classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot read the class list in {path} ({e!r}); {_REPACK}")

def check_batch(batch_size, world_size, num_images):
    if batch_size % world_size:
        raise SystemExit(f"error: batch_size={batch_size} does not split over {world_size} processes")
    if batch_size > num_images:
        raise SystemExit(f"error: batch_size={batch_size} is larger than the training set "
                         f"({num_images} images)")

def rows_of(batch, rows):
    """The given rows of every tensor in batch, a nest of tuples and lists of per-image tensors
    (the images and random draws one process augments)."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    return None if batch is None else type(batch)(rows_of(part, rows) for part in batch)

def permutation(n, seed, epoch, device):
    """The epoch's order of the training set: the same on every rank, fresh every epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)

def normalize(x):
    """(B, 3, H, W) pixel values in [0, 255] -> the network's input."""
    # fills on x's device: a tensor from a Python list would be a host-to-device copy, waiting for the GPU
    stats = lambda values: torch.cat([torch.full((1, 1, 1, 1), 255 * v, device=x.device) for v in values], 1)
    return (x - stats(MEAN)) / stats(STD)

def to_float(images_u8):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) with values in [0, 255]."""
    return images_u8.permute(0, 3, 1, 2).float()

# -----------------------------------------------------------------------------
# random resized crop + horizontal flip

CROP_RATIO = (3 / 4, 4 / 3)  # the aspect ratios a random resized crop may take, as torchvision's default

def crop_flip_draws(B, scale, device="cpu"):
    """B crops + flips' random numbers (apart from the pixel work, which torch.compile would draw
    differently): per image ten (area, log aspect) tries, top and left in the free range, the flip."""
    area = torch.empty(B, 10, device=device).uniform_(*scale)
    log_aspect = torch.empty(B, 10, device=device).uniform_(*map(math.log, CROP_RATIO))
    top, left = torch.rand(B, device=device), torch.rand(B, device=device)
    return area, log_aspect, top, left, torch.rand(B, device=device) < 0.5

def crop_boxes(draws, H, W):
    """torchvision's RandomResizedCrop.get_params for B images: (top, left, h, w), each (B,): the first
    of the ten tries that fits (as if tried in turn), else the whole image cut to the nearest allowed
    aspect ratio, centred."""
    area, log_aspect, top, left, _ = draws
    area, aspect = H * W * area, torch.exp(log_aspect)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    fw, fh = min(W, round(H * CROP_RATIO[1])), min(H, round(W / CROP_RATIO[0]))  # the fallback box
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fw)).long()
    h = torch.where(found, h, torch.full_like(h, fh)).long()
    top = torch.where(found, (top * (H - h + 1)).long(), (H - h) // 2)
    left = torch.where(found, (left * (W - w + 1)).long(), (W - w) // 2)
    return top, left, h, w

def bicubic(d, a=-0.5):
    """Pillow's bicubic kernel (a = -0.5; F.interpolate uses -0.75), written as Pillow evaluates it,
    so that in float64 it gives Pillow's own weights to the last bit."""
    d = d.abs()
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))

PRECISION_BITS = 22  # Pillow's 8-bit resampling works in fixed point: weights are multiples of 2**-22

def resize_matrix(start, length, out_size, in_size):
    """(B, out_size, in_size) float64 weights that resize each span [start, start + length) to out_size
    pixels as Pillow resizes the crop: taps outside it dropped, the rest normalised and rounded to fixed
    point. Upsampling only (length <= out_size): to shrink, Pillow widens the filter, this does not."""
    start, length = start.double().view(-1, 1, 1), length.double().view(-1, 1, 1)
    f64 = dict(dtype=torch.float64, device=start.device)
    centre = (torch.arange(out_size, **f64).view(1, -1, 1) + 0.5) * (length / out_size)
    taps = torch.floor(centre - 1.5) + torch.arange(4, **f64).view(1, 1, 4)  # (B, S, 4)
    weights = bicubic((taps - centre) + 0.5) * ((taps >= 0) & (taps < length))
    w0, w1, w2, w3 = weights.unbind(-1)
    weights = weights / (((w0 + w1) + w2) + w3).unsqueeze(-1)  # summed in Pillow's order
    one = 2.0 ** PRECISION_BITS
    weights = torch.trunc(weights * one + torch.where(weights < 0, -0.5, 0.5)) / one
    index = (torch.minimum(taps.clamp(min=0), length - 1) + start).long()  # zero-weight taps: any index
    m = torch.zeros(start.shape[0], out_size, in_size, **f64)
    return m.scatter_add_(2, index, weights)

def resample(x, rows, cols):
    """x (B, C, H, W) -> (B, C, S, S) by rows (B, S, H) and cols (B, S, W), rounded and clipped after each
    pass as Pillow does. In float64 every pixel x fixed-point weight product, and their sum, is exact."""
    x = torch.floor(x.double() @ cols.unsqueeze(1).transpose(2, 3) + 0.5).clamp(0, 255)  # (B, C, H, S)
    return torch.floor(rows.unsqueeze(1) @ x + 0.5).clamp(0, 255).to(torch.float32)

def resized_crop(x, top, left, h, w, flip, out_size):
    """Each image's box (top, left, h, w) of x (B, C, H, W), resized to out_size, mirrored where flip."""
    rows = resize_matrix(top, h, out_size, x.shape[2])
    cols = resize_matrix(left, w, out_size, x.shape[3])
    return resample(x, rows, torch.where(flip.view(-1, 1, 1), cols.flip(1), cols))

def resized_crop_flip(x, draws):
    """Each image of x (B, C, H, W, values 0..255) its own crop and mirror from crop_flip_draws."""
    top, left, h, w = crop_boxes(draws, *x.shape[2:])
    return resized_crop(x, top, left, h, w, draws[-1], x.shape[2])

def flip_only(x, draws):
    """The whole image, mirrored where crop_flip_draws says: the view without a random crop."""
    return torch.where(draws[-1].view(-1, 1, 1, 1), x.flip(3), x)

def check_eval_resize(resize_to, size):
    """eval_resize is 0 (the plain image) or at least the image size: the central crop must fit."""
    if 0 < resize_to < size:
        raise SystemExit(f"error: eval_resize={resize_to} is smaller than the {size}px images; "
                         f"give 0 (no resize) or at least {size}")

def eval_views(eval_resize):
    """The validation views to score: the plain image (0) always, and the resize_to view when given."""
    return list(dict.fromkeys([0, eval_resize]))

def view_label(resize_to):
    """A view's part of a results recipe: nothing for the plain image."""
    return f", eval resize {resize_to}" if resize_to else ""

def resize_centre_crop(x, resize_to, out_size):
    """The reference's evaluation transform: resize to resize_to, then the central out_size crop."""
    B, _, H, W = x.shape
    zeros, ones = torch.zeros(B, device=x.device), torch.ones(B, device=x.device)
    offset = int(round((resize_to - out_size) / 2.0))  # torchvision's centre-crop rounding
    rows = resize_matrix(zeros, H * ones, resize_to, H)[:, offset:offset + out_size]
    cols = resize_matrix(zeros, W * ones, resize_to, W)[:, offset:offset + out_size]
    return resample(x, rows, cols)
