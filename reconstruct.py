"""
Figure 4: MAE reconstructions of any images (resized to the model's size), or of validation images
when none are given, with a fixed seed and so fixed masks:

    python reconstruct.py --init=out/tin/ckpt_1200.pt photo.jpg drawing.png
    python reconstruct.py --init=out/tin/ckpt_1200.pt --data_dir=data/tin   # 8 validation images

Writes out_dir/reconstruct_<checkpoint name>.png: original, masked, reconstruction, and the
reconstruction with the visible patches pasted back.
"""
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps

import data
import plot
import runtime
from configurator import configure
from model import MAE

# -----------------------------------------------------------------------------
init = ""  # a pre-training checkpoint
data_dir = "data/tin"  # validation images come from here when no image files are given
out_dir = "out/reconstruct"
mask_ratio = 0.75
num_images = 8  # validation images to show when no files are given
device = "cpu"
seed = 0
# -----------------------------------------------------------------------------


def load_picture(path, size):
    """An image file as uint8 (size, size, 3), resized bicubic, the way an image viewer shows it: turned
    upright as its EXIF orientation says (phone photos are stored sideways), 16-bit values brought to 8
    bits (Pillow's own conversion clips them), and transparent parts on a white page (their stored colour,
    often black, is not part of the picture)."""
    try:
        img = ImageOps.exif_transpose(Image.open(path))
        if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: 0..65535
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        if img.has_transparency_data:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))
    except OSError as e:
        raise SystemExit(f"error: cannot read image {path}: {e}")


if __name__ == "__main__":
    args = sys.argv[1:]
    configure(globals(), [a for a in args if a.startswith("--")])
    files = [a for a in args if not a.startswith("--")]
    if not init:
        raise SystemExit("error: no checkpoint given: --init=PATH (a pre-training checkpoint)")
    device, _, _ = runtime.setup_device(device, "float32", seed)

    ckpt, cfg = runtime.load_pretrained(init)
    model = MAE(cfg, ckpt.get("norm_pix_loss", True))
    runtime.load_weights(model, ckpt["model"], init, "an MAE with its decoder (a pre-training checkpoint)")
    model = model.to(device).eval()

    if files:
        images_u8 = torch.from_numpy(np.stack([load_picture(path, cfg.img_size) for path in files])).to(device)
    else:
        val_images, _ = data.load_split(data_dir, "val", device)
        images_u8 = val_images[torch.linspace(0, len(val_images) - 1, num_images).long()]
        if images_u8.shape[1] != cfg.img_size:
            raise SystemExit(f"error: {init} was trained on {cfg.img_size}px images, {data_dir} holds "
                             f"{images_u8.shape[1]}px ones; give image files instead")

    imgs = data.normalize(data.to_float(images_u8))
    noise = torch.rand(len(imgs), cfg.num_patches, generator=torch.Generator().manual_seed(seed)).to(device)
    masked, recon, pasted = model.reconstruct(imgs, noise, mask_ratio)
    runtime.make_out_dir(out_dir)
    name = os.path.splitext(os.path.basename(init))[0]
    png = os.path.join(out_dir, f"reconstruct_{name}.png")
    plot.save_reconstructions([imgs, masked, recon, pasted], png,
                              f"MAE reconstructions, {init} (pre-training epoch {ckpt.get('epoch', 0):g}), "
                              f"{mask_ratio:.0%} masked")
    print(f"wrote {png}")
