"""
Linear probing of pre-trained MAE encoders, with a weighted k-nearest-neighbour accuracy beside it:

    python probe.py --init=out/tin/ckpt_100.pt
    python probe.py --init='out/tin/ckpt_[0-9]*.pt'   # each checkpoint in turn (a glob, or an a,b,c list)

The protocol, as the reference's code also runs it: a frozen encoder, BatchNorm without affine parameters
then a Linear on the cls token, 50 epochs at batch 128, AdamW (0.9, 0.95), the horizontal flip as the only
augmentation. With a frozen encoder and only a flip, each training image has two possible feature vectors:
computed once, the head trains on them, the same mathematics as running the encoder at every step
(test_eval.py checks it), in seconds instead of hours. train_crop=True trains the head on fresh random
resized crops every step instead (as the reference's code did before its commit 3f004d5), which runs the
encoder on every batch: 50 passes over the training set instead of 2.

The validation images are scored as they are (64x64) and, with eval_resize > 0, in the reference's view
(resized to 73, then the central 64x64 crop), with the same head. Each checkpoint appends a linear_probe
and a knn line per view to out_dir/results.jsonl; a probe line's top1 is the head's after the last epoch,
its best_top1 the best after any epoch (what the reference reports).
"""
import glob
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

import data
import runtime
from configurator import configure
from model import classifier_head, param_groups, pretrained_encoder

# -----------------------------------------------------------------------------
data_dir = "data/tin"
out_dir = "out/probe"
init = ""  # pre-training checkpoint(s): a path, a comma-separated list or a glob
features = "cls"  # 'cls' token (the reference's), 'avg' of the patch tokens after the final norm, or 'both'
train_crop = False  # True: random resized crops (crop_scale) + flip; False: flip only
crop_scale = (0.08, 1.0)  # with train_crop: the crop's share of the image's area
batch_size = 128
epochs = 50
warmup_epochs = 2
blr = 1e-3  # lr = blr * batch_size / 256
weight_decay = 0.0
decay_all = False  # True: decay the head's bias too, as the reference's code does
beta1 = 0.9
beta2 = 0.95
eval_resize = 73  # also score the reference's view (resize to 73, central 64 crop); 0: the plain images only
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
def outputs(fn, images_u8, dtype, batch_size, flip=False, resize_to=0, what="outputs"):
    """fn on uint8 images (N, H, W, 3), batch by batch, in float32: mirrored when flip, resized to resize_to
    and centre-cropped when resize_to > 0 (the reference's evaluation view)."""
    out, progress = [], runtime.Progress(len(images_u8), 0, 1)
    for i in range(0, len(images_u8), batch_size):
        if progress.due(10):
            eta = runtime.fmt_duration(progress.tick(i)[1])
            print(f"  {what}: {i:,}/{len(images_u8):,} images, ETA {eta}", flush=True)
        x = data.to_float(images_u8[i:i + batch_size])  # (B, 3, H, W), 0..255
        if resize_to > 0:
            x = data.resize_centre_crop(x, resize_to, x.shape[-1])
        with torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            y = fn(data.normalize(x.flip(3) if flip else x))
        out.append(y.float().clone())  # a copy: a view would keep the batch's (B, 1 + L, D) tokens alive
    return torch.cat(out)

def pooled(encoder, features):
    """normalised images (B, 3, H, W) -> (B, F): the cls token, the patch tokens' mean ('avg'), or both."""
    def fn(x):
        tokens = encoder(x).float()  # (B, 1 + L, D)
        cls, avg = tokens[:, 0], tokens[:, 1:].mean(dim=1)
        return {"cls": cls, "avg": avg, "both": torch.cat([cls, avg], dim=1)}[features]
    return fn

def encode(encoder, images_u8, features, dtype, batch_size, flip=False, resize_to=0):
    """(N, F) features of uint8 images (N, H, W, 3), in the view outputs() describes."""
    what = "mirrored" if flip else f"resized to {resize_to}" if resize_to else "plain"
    return outputs(pooled(encoder, features), images_u8, dtype, batch_size, flip, resize_to,
                   f"features ({what})")

def top_k_accuracy(scores, labels):
    """Top-1 and top-5 (%) of class scores (N, C); of equal scores the lower class ranks first."""
    top = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]
    hit = top == labels[:, None]
    return 100 * hit[:, 0].sum().item() / len(labels), 100 * hit.any(dim=1).sum().item() / len(labels)

@torch.no_grad()
def knn_scores(train_f, train_y, val_f, num_classes, k, temperature):
    """Weighted k-NN votes (N_val, num_classes), as DINO's evaluation: the k training features most
    cosine-similar to a validation feature vote for their class with weight exp(similarity / temperature)."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    scores = []
    for i in range(0, len(val_f), 1024):
        sim, idx = (val_f[i:i + 1024] @ train_f.T).topk(k, dim=1)  # (b, k) each
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()))
    return torch.cat(scores)

def knn_subset(num_images, num_train, k, seed, device):
    """The training images the k-NN takes its neighbours from: num_images of them, a fixed seeded subset
    (0: all); k must not be larger."""
    n = num_images or num_train
    if not k <= n <= num_train:
        raise SystemExit(f"error: knn_k={k} neighbours among {n:,} training images: give knn_k <= the number "
                         f"of neighbours, and at most {num_train:,} of them (knn_train_images)")
    if n == num_train:
        return slice(None)  # a view of the training set: indexing by every id would copy it whole
    ids = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))[:n]
    return ids.sort().values.to(device)

def crop_features(encoder, images_u8):
    """features_of for train_head with train_crop: each step's images freshly cropped and resized
    (torchvision's RandomResizedCrop with crop_scale, Pillow's bicubic), mirrored where flip says."""
    @torch.no_grad()
    def features_of(idx, flip):
        x = data.to_float(images_u8[idx])  # (B, 3, H, W)
        top, left, h, w = data.crop_boxes(data.crop_flip_draws(len(idx), crop_scale, device), *x.shape[2:])
        x = data.resized_crop(x, top, left, h, w, flip, x.shape[2])
        with torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            return pooled(encoder, features)(data.normalize(x))
    return features_of

def train_head(features_of, labels, dim, num_classes, after_epoch=lambda head: None):
    """BatchNorm + Linear trained on features_of(indices, flip) -> (B, dim), which hides whether the features
    are cached or computed afresh; after_epoch(head) sees the head, in eval mode, after every epoch."""
    torch.manual_seed(seed)
    head = classifier_head(dim, num_classes, batchnorm=True, init_std=0.01).to(device)  # the official probe's
    lr = blr * batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(head, weight_decay, decay_all=decay_all), lr=lr,
                                  betas=(beta1, beta2), fused=device.startswith("cuda"))

    def head_step(idx):
        flip = torch.rand(len(idx), device=device) < 0.5
        loss = F.cross_entropy(head(features_of(idx, flip)), labels[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda_graph:  # launched one by one, the head's few small kernels leave the GPU idle
        head_step = runtime.cuda_graphed(head_step, optimizer)
    iters_per_epoch = len(labels) // batch_size
    total_iters, warmup_iters = epochs * iters_per_epoch, warmup_epochs * iters_per_epoch

    def get_lr(it):
        """Linear warm-up from 0, then half a cosine down to 0, per iteration."""
        if it < warmup_iters:
            return lr * it / warmup_iters
        decay_ratio = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay_ratio)))

    progress = runtime.Progress(total_iters, 0, batch_size)
    for it in range(total_iters):
        if progress.due(10):
            eta = runtime.fmt_duration(progress.tick(it)[1])
            print(f"  head: epoch {it / iters_per_epoch:.1f}/{epochs}, ETA {eta}", flush=True)
        epoch, step = divmod(it, iters_per_epoch)
        if step == 0:
            perm = data.permutation(len(labels), seed, epoch, device)
        runtime.set_lr(optimizer, get_lr(it))
        runtime.seed_step(seed, it)
        head_step(perm[step * batch_size:(step + 1) * batch_size])
        if step == iters_per_epoch - 1:
            with torch.no_grad():
                after_epoch(head.eval())
            head.train()
    return head.eval()

def checkpoint_paths(spec):
    paths = [p for part in spec.split(",") if part for p in (sorted(glob.glob(part)) or [part])]
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]  # ckpt_100 < ckpt_1200
    return sorted(dict.fromkeys(paths), key=natural)

def probe(path, train_images, train_labels, val_images, val_labels, num_classes):
    t0 = time.time()
    ckpt = runtime.load_checkpoint(path)
    encoder = pretrained_encoder(ckpt, path, train_images.shape[1])[0].to(device).eval()
    encoder = torch.compile(encoder) if compile else encoder
    f = lambda images, **view: encode(encoder, images, features, dtype, eval_batch_size, **view)
    train_f = f(train_images)  # (N, F): the k-NN's neighbours
    if train_crop:
        features_of = crop_features(encoder, train_images)
    else:  # the two possible feature vectors of every training image: (N, 2, F), index 1 mirrored
        cached = torch.stack([train_f, f(train_images, flip=True)], dim=1)
        features_of = lambda idx, flip: cached[idx, flip.long()]
    val_f = {view: f(val_images, resize_to=view) for view in data.eval_views(eval_resize)}
    t_features = time.time() - t0
    last, best = {}, dict.fromkeys(val_f, 0.0)  # {view: (top-1, top-5)} after the last epoch; the best top-1

    def score_epoch(head):
        for view, vf in val_f.items():
            last[view] = top_k_accuracy(head(vf), val_labels)
            best[view] = max(best[view], last[view][0])

    train_head(features_of, train_labels, train_f.shape[1], num_classes, score_epoch)
    common = {"checkpoint": path, "pretrain_epoch": ckpt.get("epoch"), "wall_s": time.time() - t0,
              "hardware": runtime.hardware(device)}
    rows, crops = [], f", crops {crop_scale[0]:g}-{crop_scale[1]:g}" if train_crop else ""
    for view, vf in val_f.items():
        (top1, top5), name = last[view], data.view_label(view)
        votes = knn_scores(train_f, train_labels, vf, num_classes, knn_k, knn_temperature)
        knn = top_k_accuracy(votes, val_labels)
        print(f"{path} (pre-training epoch {ckpt.get('epoch', 0):g}){name}: linear probe top-1 {top1:.2f}% "
              f"(best {best[view]:.2f}%) top-5 {top5:.2f}% | {knn_k}-NN top-1 {knn[0]:.2f}%", flush=True)
        rows += [{**common, "method": "linear_probe", "recipe": f"{features}, {epochs} ep{crops}{name}",
                  "top1": top1, "top5": top5, "best_top1": best[view]},
                 {**common, "method": "knn", "recipe": f"{features}, k={knn_k}{name}", "top1": knn[0],
                  "top5": knn[1]}]
    print(f"  features {t_features:.1f} s, total {common['wall_s']:.1f} s")
    runtime.append_jsonl(os.path.join(out_dir, "results.jsonl"), *rows)

if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    paths = checkpoint_paths(init)
    if not paths:
        raise SystemExit("error: no checkpoint given: --init=PATH (a path, a,b,c list or glob); see --help")
    device, _, _ = runtime.setup(device, seed)
    cuda_graph = runtime.use_cuda_graphs(cuda_graph, device, 1)
    train_images, train_labels = data.load_split(data_dir, "train", device)
    val_images, val_labels = data.load_split(data_dir, "val", device, size=train_images.shape[1])
    data.check_eval_resize(eval_resize, val_images.shape[1])
    data.check_batch(batch_size, 1, len(train_images))
    knn_subset(0, len(train_images), knn_k, seed, device)
    runtime.make_out_dir(out_dir)
    for i, path in enumerate(paths, 1):
        print(f"checkpoint {i}/{len(paths)}: {path}", flush=True)  # its progress lines follow
        probe(path, train_images, train_labels, val_images, val_labels, data.num_classes(data_dir))
