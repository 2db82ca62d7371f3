"""
Linear probing of pre-trained MAE encoders, with a k-nearest-neighbour accuracy beside it:

    python probe.py --init=out/tin/ckpt_100.pt
    python probe.py --init='out/tin/ckpt_[0-9]*.pt'   # each checkpoint in turn (a glob or a,b,c list)

The reference protocol: frozen encoder, BatchNorm without affine parameters then a Linear head on
the cls token, 50 epochs, batch 128, AdamW, horizontal flip as the only augmentation. With a frozen
encoder and flip as the only augmentation each training image has exactly two possible feature
vectors, so we compute them once and train the head on those: the same mathematics as running the
encoder every step (test_eval.py checks it), in seconds instead of hours.

The reference's own code trains its probe on more than its config says: train_classifier.py never
passes use_rrc=False, so torchvision's RandomResizedCrop (scale 0.08 to 1, bicubic) comes before the
flip. train_crop=True trains the head that way too, on fresh crops every step (Pillow's crop, as in
pre-training): nothing to cache then, so the encoder runs on every step's batch, 50 passes over the
training set instead of 2.

The validation images are scored as they are (64x64) and, with eval_resize > 0, also in the
reference's view (resized to 73, the central 64x64 crop): the same head and training features, so
the second view costs one more pass over the 10,000 validation images. Each checkpoint appends a
linear_probe and a knn line per view to out_dir/results.jsonl; a probe line's top1 is the head's
after the last epoch, its best_top1 the best after any epoch (what the reference reports).
"""
import glob
import json
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import runtime
from configurator import configure

# -----------------------------------------------------------------------------
data_dir = "data/tin"
out_dir = "out/probe"
init = ""  # pre-training checkpoint(s): a path, a comma-separated list or a glob
features = "cls"  # 'cls' token (the reference's), 'avg' of the patch tokens after the final norm, or 'both'
train_crop = False  # True: random resized crops (crop_scale) + flip, as the reference's code trains; False: flip only
crop_scale = (0.08, 1.0)  # with train_crop: the crop's share of the image, as the reference's classification runs
batch_size = 128
epochs = 50
warmup_epochs = 2
blr = 1e-3  # lr = blr * batch_size / 256
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
eval_resize = 73  # also score the reference's view (resize to 73, central 64 crop); 0: the plain 64x64 image only
knn_k = 20
knn_temperature = 0.07
eval_batch_size = 512  # feature extraction
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = False  # the encoder runs once per image: compiling rarely pays
cuda_graph = torch.cuda.is_available()  # replay each head step as a CUDA graph: 39,000 tiny steps
seed = 0
# -----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(encoder, images_u8, flip=False, resize_to=0):
    """(N, F) features of uint8 images (N, H, W, 3), mirrored when flip, resized to resize_to and
    centre-cropped when resize_to > 0 (the reference's evaluation view)."""
    out, progress = [], runtime.Progress(len(images_u8), 0, 1)
    what = "mirrored" if flip else f"resized to {resize_to}" if resize_to else "plain"
    for i in range(0, len(images_u8), eval_batch_size):
        if progress.due(10):
            print(f"  features ({what}): {i:,}/{len(images_u8):,} images, "
                  f"ETA {runtime.fmt_duration(progress.tick(i)[1])}", flush=True)
        x = data.to_float(images_u8[i:i + eval_batch_size])
        if resize_to > 0:
            x = data.resize_centre_crop(x, resize_to, x.shape[-1])
        # a copy: a view would keep the batch's whole (B, 1 + L, D) tokens alive
        out.append(encode(encoder, x.flip(3) if flip else x).clone())
    return torch.cat(out)


def encode(encoder, x):
    """The chosen features (B, F) of float images x (B, 3, H, W) with values 0..255."""
    with runtime.autocast(device, dtype):
        tokens = encoder(data.normalize(x)).float()  # (B, 1 + L, D)
    cls, avg = tokens[:, 0], tokens[:, 1:].mean(dim=1)  # (B, D) each
    return {"cls": cls, "avg": avg, "both": torch.cat([cls, avg], dim=1)}[features]


def crop_features(encoder, images_u8):
    """features_of for train_head when train_crop: each step's images freshly cropped and resized
    (torchvision's RandomResizedCrop with crop_scale, Pillow's bicubic), mirrored where flip says."""
    @torch.no_grad()
    def features_of(idx, flip):
        x = data.to_float(images_u8[idx])  # (B, 3, H, W)
        top, left, h, w = data.crop_boxes(data.crop_flip_draws(len(idx), crop_scale, device), *x.shape[2:])
        return encode(encoder, data.resized_crop(x, top, left, h, w, flip, x.shape[2]))
    return features_of


def train_head(features_of, labels, dim, num_classes, after_epoch=lambda head: None):
    """Train BatchNorm + Linear on features_of(indices, flip) -> (B, dim) with the protocol's
    schedule; features_of hides whether the features are cached or computed afresh. after_epoch
    sees the head, in eval mode, at the end of every epoch."""
    n = len(labels)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes)).to(device)
    nn.init.trunc_normal_(head[1].weight, std=0.01)  # as the official linear probe
    nn.init.zeros_(head[1].bias)
    lr = blr * batch_size / 256
    # no decay on the bias, as README's settings say (and the official probe's LARS skips 1-D parameters)
    optimizer = torch.optim.AdamW(runtime.param_groups(head, weight_decay), lr=lr, betas=(beta1, beta2),
                                  fused=device.startswith("cuda"))

    def head_step(idx):
        flip = torch.rand(len(idx), device=device) < 0.5
        loss = F.cross_entropy(head(features_of(idx, flip)), labels[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda_graph:  # launched one by one, the head's few small kernels leave the GPU idle
        runtime.make_capturable(optimizer, device)
        head_step = runtime.cuda_graphed(head_step)
    iters_per_epoch = n // batch_size
    progress = runtime.Progress(epochs * iters_per_epoch, 0, batch_size)
    for it in range(epochs * iters_per_epoch):
        if progress.due(10):
            print(f"  head: epoch {it / iters_per_epoch:.1f}/{epochs}, ETA {runtime.fmt_duration(progress.tick(it)[1])}",
                  flush=True)
        epoch, step = divmod(it, iters_per_epoch)
        if step == 0:
            perm = data.permutation(n, seed, epoch, device)
        runtime.set_lr(optimizer, runtime.cosine_lr(it, lr, warmup_epochs * iters_per_epoch, epochs * iters_per_epoch))
        runtime.seed_step(seed, it)
        head_step(perm[step * batch_size:(step + 1) * batch_size])
        if step == iters_per_epoch - 1:
            with torch.no_grad():
                after_epoch(head.eval())
            head.train()
    return head.eval()


def top_k_accuracy(scores, labels):
    """Top-1 and top-5 (%) of class scores (N, C)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return 100 * hit[:, 0].float().mean().item(), 100 * hit.any(dim=1).float().mean().item()


@torch.no_grad()
def knn_scores(train_f, train_y, val_f, num_classes):
    """Weighted k-NN votes (N_val, C): cosine similarity, the k nearest training features vote
    with weight exp(similarity / temperature), as in DINO's evaluation."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    scores = []
    for i in range(0, len(val_f), 1024):
        sim, idx = (val_f[i:i + 1024] @ train_f.T).topk(knn_k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / knn_temperature).exp()))
    return torch.cat(scores)


def checkpoint_paths(spec):
    paths = [p for part in spec.split(",") if part for p in (sorted(glob.glob(part)) or [part])]
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]  # ckpt_100 < ckpt_1200
    return sorted(dict.fromkeys(paths), key=natural)


def probe(path, train_images, train_labels, val_images, val_labels, num_classes):
    t0 = time.time()
    encoder, _, ckpt = runtime.load_encoder(path, train_images.shape[1])
    encoder = encoder.to(device).eval()
    if compile:
        encoder = torch.compile(encoder)
    train_f = extract_features(encoder, train_images)  # (N, F): the k-NN's neighbours
    if train_crop:
        features_of = crop_features(encoder, train_images)
    else:  # the two possible feature vectors of every training image: (N, 2, F), index 1 = mirrored
        cached = torch.stack([train_f, extract_features(encoder, train_images, flip=True)], dim=1)
        features_of = lambda idx, flip: cached[idx, flip.long()]
    val_f = {view: extract_features(encoder, val_images, resize_to=view) for view in data.eval_views(eval_resize)}
    t_features = time.time() - t0
    last, best = {}, dict.fromkeys(val_f, 0.0)  # {view: (top-1, top-5)} after the last epoch; best top-1

    def score_epoch(head):
        for view, f in val_f.items():
            last[view] = top_k_accuracy(head(f), val_labels)
            best[view] = max(best[view], last[view][0])

    train_head(features_of, train_labels, train_f.shape[1], num_classes, score_epoch)
    wall = time.time() - t0
    common = {"checkpoint": path, "pretrain_epoch": ckpt.get("epoch"), "wall_s": wall,
              "hardware": runtime.hardware(device)}
    rows, crops = [], f", crops {crop_scale[0]:g}-{crop_scale[1]:g}" if train_crop else ""
    for view, f in val_f.items():
        (top1, top5), name = last[view], data.view_label(view)
        knn_acc = top_k_accuracy(knn_scores(train_f, train_labels, f, num_classes), val_labels)
        print(f"{path} (pre-training epoch {ckpt.get('epoch', 0):g}){name}: linear probe top-1 {top1:.2f}% "
              f"(best {best[view]:.2f}%) top-5 {top5:.2f}% | {knn_k}-NN top-1 {knn_acc[0]:.2f}%", flush=True)
        rows += [{**common, "method": "linear_probe", "recipe": f"{features}, {epochs} ep{crops}{name}", "top1": top1,
                  "top5": top5, "best_top1": best[view]},
                 {**common, "method": "knn", "recipe": f"{features}, k={knn_k}{name}", "top1": knn_acc[0],
                  "top5": knn_acc[1]}]
    print(f"  features {t_features:.1f} s, total {wall:.1f} s")
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    paths = checkpoint_paths(init)
    if not paths:
        raise SystemExit("error: no checkpoint given: --init=PATH (a path, a,b,c list or a glob)")
    device, _, _ = runtime.setup_device(device, dtype, seed)
    cuda_graph = runtime.use_cuda_graphs(cuda_graph, device, 1)
    train_images, train_labels = data.load_split(data_dir, "train", device)
    val_images, val_labels = data.load_split(data_dir, "val", device, size=train_images.shape[1])
    data.check_eval_resize(eval_resize, val_images.shape[1])
    for key, value in (("batch_size", batch_size), ("knn_k", knn_k)):
        if value > len(train_images):
            raise SystemExit(f"error: {key}={value} is larger than the training set ({len(train_images)} images)")
    runtime.make_out_dir(out_dir)
    for i, path in enumerate(paths, 1):
        print(f"checkpoint {i}/{len(paths)}: {path}", flush=True)  # its progress lines follow
        probe(path, train_images, train_labels, val_images, val_labels, data.num_classes(data_dir))
