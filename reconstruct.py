"""
Figure 4: MAE reconstructions of any images (resized to the model's size), or of validation images when none
are given, with fixed masks:

    python reconstruct.py --init=out/tin/ckpt_1200.pt photo.jpg drawing.png
    python reconstruct.py --init=out/tin/ckpt_1200.pt --data_dir=data/tin   # 8 validation images

Writes out_dir/reconstruct_<checkpoint name>.png: original, masked input, reconstruction, and the
reconstruction with the visible patches pasted back. pretrain.py's recon_{epoch}.png come from the same code.
"""
import os
import sys
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageOps

import data
import runtime
from configurator import configure
from model import MAE, load_weights, model_config, patchify, unpatchify
from plot import write_png

# -----------------------------------------------------------------------------
init = ""  # a pre-training checkpoint
data_dir = "data/tin"  # validation images come from here when no image files are given
out_dir = "out/reconstruct"
mask_ratio = 0.75
num_images = 8  # validation images to show when no files are given
device = "cpu"
seed = 0  # fixes the masks
# -----------------------------------------------------------------------------

@torch.no_grad()
def pictures(model, imgs, noise, mask_ratio):
    """[original, masked input, reconstruction, reconstruction with the visible patches pasted back], each
    (B, C, H, W) in the input's normalisation. With norm_pix_loss the predicted patches are un-normalised with
    the mean and spread of the visible patches only: the picture borrows nothing from the hidden ones."""
    _, pred, mask = model(imgs, mask_ratio, noise)  # (B, L, p*p*C), (B, L)
    p, target, pred = model.cfg.patch_size, patchify(imgs, model.cfg.patch_size), pred.float()
    if model.norm_pix_loss:
        visible = (1 - mask).unsqueeze(-1)  # (B, L, 1)
        n = visible.sum(dim=1, keepdim=True)
        mean = (target.mean(-1, keepdim=True) * visible).sum(1, keepdim=True) / n
        std = (target.var(-1, keepdim=True).add(1e-6).sqrt() * visible).sum(1, keepdim=True) / n
        pred = pred * std + mean
    hidden, visible = mask.unsqueeze(-1), target * (1 - mask.unsqueeze(-1))
    return [imgs, unpatchify(visible, p), unpatchify(pred, p), unpatchify(visible + pred * hidden, p)]

def save_pictures(rows, png_path, title):
    """A grid, one row per tensor of pictures(), each row labelled."""
    names = ["original", "masked input", "reconstruction", "reconstruction\n+ visible patches"]
    mean, std = torch.tensor(data.MEAN).view(1, 3, 1, 1), torch.tensor(data.STD).view(1, 3, 1, 1)
    B = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), B, figsize=(1.2 * B + 1, 1.3 * len(rows)), squeeze=False)
    for r, batch in enumerate(rows):
        images = (batch.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for b in range(B):
            axes[r, b].imshow(images[b])
            axes[r, b].set_xticks([])
            axes[r, b].set_yticks([])
        axes[r, 0].set_ylabel(names[r], fontsize=8)
    fig.suptitle(textwrap.fill(title, max(40, 16 * B)), fontsize=9)  # a long title would widen a narrow grid
    write_png(fig, png_path)

def load_picture(path, size):
    """An image file as uint8 (size, size, 3), resized bicubic, as an image viewer shows it: upright as its
    EXIF orientation says (phone photos are stored sideways), 16-bit values brought to 8 bits (Pillow's
    conversion clips them), transparent parts on white (their stored colour, often black, is not shown)."""
    try:
        img = ImageOps.exif_transpose(Image.open(path))
        if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: 0..65535
            img = Image.fromarray((np.asarray(img, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        if img.has_transparency_data:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))
    except OSError as e:
        raise SystemExit(f"error: cannot read image {path}: {e}")

if __name__ == "__main__":
    configure(globals(), [a for a in sys.argv[1:] if a.startswith("-")])
    files = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not init:
        raise SystemExit("error: no checkpoint given: --init=PATH (a pre-training checkpoint); see --help")
    device, _, _ = runtime.setup(device, seed)
    ckpt = runtime.load_checkpoint(init)
    cfg = model_config(ckpt, init, pretraining=True)
    model = MAE(cfg, ckpt.get("config", {}).get("norm_pix_loss", True))
    load_weights(model, ckpt["model"], init, "an MAE with its decoder (a pre-training checkpoint)")
    model = model.to(device).eval()
    if files:
        images_u8 = torch.from_numpy(np.stack([load_picture(f, cfg.img_size) for f in files])).to(device)
    else:
        val_images, _ = data.load_split(data_dir, "val", device)
        images_u8 = val_images[torch.linspace(0, len(val_images) - 1, num_images).long()]
        if images_u8.shape[1] != cfg.img_size:
            raise SystemExit(f"error: {init} was trained on {cfg.img_size}px images, {data_dir} holds "
                             f"{images_u8.shape[1]}px ones; give image files instead")
    imgs = data.normalize(data.to_float(images_u8))
    noise = torch.rand(len(imgs), cfg.num_patches, generator=torch.Generator().manual_seed(seed)).to(device)
    runtime.make_out_dir(out_dir)
    png = os.path.join(out_dir, f"reconstruct_{os.path.splitext(os.path.basename(init))[0]}.png")
    save_pictures(pictures(model, imgs, noise, mask_ratio), png, f"{init} (pre-training epoch "
                  f"{ckpt.get('epoch', 0):g}): reconstructions, {mask_ratio:.0%} of the patches masked")
    print(f"wrote {png}")
