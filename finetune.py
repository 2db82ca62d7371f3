"""
Fine-tuning of a pre-trained MAE encoder (or of the same network from scratch) on Tiny ImageNet:

    python finetune.py config/ft_ref.py --init=out/tin/ckpt_700.pt   # the reference recipe
    python finetune.py config/ft_tin.py --init=out/tin/ckpt_700.pt   # ours
    python finetune.py config/ft_tin.py --init=scratch               # no pre-training
    torchrun --standalone --nproc_per_node=4 finetune.py config/ft_tin.py --init=...

All augmentation (crop, flip, RandAugment, random erasing, mixup/cutmix) runs on whole batches on
the device. Top-1/top-5 on the 10,000 validation images every eval_every epochs, as they are (64x64)
and, with eval_resize > 0, also in the reference's view (resized to 73, the central 64x64 crop).
Output in out_dir: ckpt_last.pt (resume with --resume=True), ckpt_best.pt (the best plain-view
top-1), finetune_log.jsonl (loss and accuracy of each evaluated epoch), and one line per view in
results.jsonl.
Ctrl-C or SIGTERM saves ckpt_last.pt at the next progress line and stops there.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import data
import runtime
import steps
from configurator import check_same_run, configure
from model import Classifier, ViTConfig

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/tin"
out_dir = "out/finetune"
init = "scratch"  # a pre-training checkpoint, or 'scratch' for the reference ViT-Lite from random weights
resume = False  # continue from out_dir/ckpt_last.pt
recipe = "ref"  # a name for the results table; its lines add the epochs, so a short run is a line of its own
log_interval = 50
save_last_every_s = 60.0
eval_every = 1  # epochs
eval_resize = 73  # also score the reference's view (resize to 73, central 64 crop); 0: the plain 64x64 image only
eval_batch_size = 512
# model
pool = "cls"  # 'cls' token (the reference) or 'avg' of the patch tokens with a LayerNorm (official MAE)
drop_path = 0.0
# optimisation: the reference recipe (../shared/reference.md)
batch_size = 128  # global, across all processes
epochs = 100
warmup_epochs = 5
blr = 1e-3  # lr = blr * batch_size / 256
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.999
layer_decay = 1.0  # 1: every layer learns at the same rate
clip_grad = 0.0  # 0: no clipping
# augmentation
crop_scale = (0.08, 1.0)
rand_augment_ops = 2
rand_augment_magnitude = 9
rand_augment_interpolation = "bicubic"  # resampling of its geometric ops: the reference's and the official MAE's
mixup_mode = "batch"  # timm's Mixup: 'batch' (one draw for the whole batch, its default) or 'elem' (per image)
reprob = 0.0  # random erasing probability
mixup = 0.0  # Beta alpha; 0 turns it off
cutmix = 0.0
label_smoothing = 0.0
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()
cuda_graph = torch.cuda.is_available()  # replay each step as CUDA graphs (one process only)
attention = "auto"  # attention kernel: 'auto', 'flash', 'efficient', 'cudnn', 'math' or 'encoder=..,decoder=..'
seed = 0
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])

device, rank, world_size = runtime.setup_device(device, dtype, seed)
graphs = runtime.use_cuda_graphs(cuda_graph, device, world_size)
master = rank == 0
if batch_size % world_size:
    raise SystemExit(f"error: batch_size={batch_size} does not split over {world_size} processes")
if master:
    runtime.make_out_dir(out_dir)
log_path, last_path, best_path = (os.path.join(out_dir, f) for f in ("finetune_log.jsonl", "ckpt_last.pt",
                                                                             "ckpt_best.pt"))
if not resume and os.path.exists(last_path):  # a fresh run would overwrite its resume point
    raise SystemExit(f"error: {out_dir} already holds a run ({last_path}): continue it with --resume=True, "
                     f"or give another out_dir")
train_images, train_labels = data.load_split(data_dir, "train", device)
val_images, val_labels = data.load_split(data_dir, "val", device, size=train_images.shape[1])
num_classes = data.num_classes(data_dir)
data.check_eval_resize(eval_resize, val_images.shape[1])
iters_per_epoch = len(train_images) // batch_size
if iters_per_epoch == 0:
    raise SystemExit(f"error: batch_size={batch_size} is larger than the training set ({len(train_images)})")
total_iters = epochs * iters_per_epoch
lr = blr * batch_size / 256

# the model: the pre-trained encoder with a new head, or all random; a resumed run takes every weight
# from ckpt_last.pt, so it needs no pre-training checkpoint (which may be gone by then)
pretrain_epoch, ckpt, encoder = None, None, None
if resume:
    ckpt = runtime.load_checkpoint(last_path, ("model", "optimizer", "model_args", "iter_num"))
    check_same_run(ckpt, config, last_path, len(train_images))
    cfg = runtime.model_config(ckpt, last_path)
elif init == "scratch":
    cfg = ViTConfig(img_size=train_images.shape[1])
else:
    encoder, cfg, pre = runtime.load_encoder(init, train_images.shape[1])
    pretrain_epoch = pre.get("epoch")
    del pre
model = Classifier(cfg, num_classes, pool, drop_path)
if encoder is not None:
    model.encoder.load_state_dict(encoder.state_dict())
    del encoder
model = model.to(device)
optimizer = torch.optim.AdamW(runtime.layer_decay_groups(model, weight_decay, layer_decay), lr=lr,
                              betas=(beta1, beta2), fused=device.startswith("cuda"))
views = data.eval_views(eval_resize)
iter_num, best_top1, train_time, epoch_loss_sum = 0, dict.fromkeys(views, 0.0), 0.0, 0.0
last_saved = None  # the iteration ckpt_last.pt holds
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
    runtime.load_optimizer(optimizer, ckpt["optimizer"])
    iter_num, best_top1, train_time = ckpt["iter_num"], ckpt["best_top1"], ckpt["train_time"]
    epoch_loss_sum, pretrain_epoch = ckpt["epoch_loss_sum"], ckpt["pretrain_epoch"]
    last_saved = iter_num
    del ckpt
    if master:
        runtime.truncate_log(log_path, iter_num // iters_per_epoch)
elif master and os.path.exists(log_path):
    os.remove(log_path)
raw_model = model
runtime.pin_attention(model, attention, device, dtype)
model = runtime.wrap_model(model, compile, device, world_size)
stop = runtime.StopSignal(device)  # from here on Ctrl-C and SIGTERM stop at a log point, saved
if master:
    print(f"fine-tuning {'from scratch' if init == 'scratch' else init} ({pool} head, "
          f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters) on {len(train_images):,} "
          f"images of {num_classes} classes, {iters_per_epoch} iterations per epoch, {world_size} process(es), "
          f"device {device}, {dtype}, CUDA graphs {'on' if graphs else 'off'}, attention {attention}, lr {lr:.2e}")


def save_checkpoint(path, done):
    runtime.save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "model_args": asdict(cfg), "num_train": len(train_images), "iter_num": done,
                         "best_top1": best_top1, "train_time": train_time, "epoch_loss_sum": epoch_loss_sum,
                         "pretrain_epoch": pretrain_epoch, "config": config}, path)


# -----------------------------------------------------------------------------
# training loop
train_step = steps.make_finetune_step(
    model, optimizer, num_classes=num_classes, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
    crop_scale=crop_scale, rand_augment_ops=rand_augment_ops, rand_augment_magnitude=rand_augment_magnitude,
    rand_augment_interpolation=rand_augment_interpolation, reprob=reprob, mixup=mixup, cutmix=cutmix,
    mixup_mode=mixup_mode, label_smoothing=label_smoothing, clip_grad=clip_grad,
    device=device, dtype=dtype, compile=compile, cuda_graph=graphs)
evaluate = lambda: {view: steps.evaluate(raw_model, val_images, val_labels, batch_size=eval_batch_size,
                                         device=device, dtype=dtype, resize_to=view) for view in views}
window = torch.zeros(log_interval, device=device)  # losses since the last log point, read only there
last_log, last_save, t_start = iter_num, time.time(), time.time() - train_time
progress = runtime.Progress(total_iters, iter_num, batch_size)
perm, scores = None, None  # scores: {view: (top-1, top-5)} of the last evaluation
for it in range(iter_num, total_iters):
    epoch, step = divmod(it, iters_per_epoch)
    if perm is None or step == 0:
        perm = data.permutation(len(train_images), seed, epoch, device)
    runtime.set_lr(optimizer, runtime.cosine_lr(it, lr, warmup_epochs * iters_per_epoch, total_iters))
    idx = perm[step * batch_size:(step + 1) * batch_size]
    window[it - last_log] = train_step(train_images[idx], train_labels[idx], it)

    done = it + 1
    epochs_done, into_epoch = divmod(done, iters_per_epoch)
    epoch_end = into_epoch == 0
    if done - last_log < log_interval and not epoch_end:
        continue
    losses = runtime.finite_losses(window, done - last_log, last_log, raw_model, last_path, last_saved)
    epoch_loss_sum += sum(losses)
    last_log = done
    train_time = time.time() - t_start
    if master:
        images_per_s, eta = progress.tick(done)
        print(f"epoch {done / iters_per_epoch:6.2f}/{epochs} | iter {done}/{total_iters} | loss {losses[-1]:.4f} | "
              f"lr {float(optimizer.param_groups[-1]['lr']):.2e} | {images_per_s:,.0f} img/s | "
              f"ETA {runtime.fmt_duration(eta)}", flush=True)
    if epoch_end and (epochs_done % eval_every == 0 or epochs_done == epochs):
        scores = evaluate()
        improved = scores[0][0] > best_top1[0]
        best_top1 = {view: max(best_top1[view], scores[view][0]) for view in views}
        if master:
            print(f"epoch {epochs_done}: validation " + "; ".join(
                f"{f'resized to {view}' if view else 'plain'}: top-1 {top1:.2f}% top-5 {top5:.2f}% "
                f"(best {best_top1[view]:.2f}%)"
                for view, (top1, top5) in scores.items()), flush=True)
            row = {"epoch": epochs_done, "loss": epoch_loss_sum / iters_per_epoch}
            for view, (top1, top5) in scores.items():
                suffix = f"_resize{view}" if view else ""  # top1, top5 and top1_resize73, top5_resize73
                row.update({f"top1{suffix}": top1, f"top5{suffix}": top5})
            with open(log_path, "a") as f:
                f.write(json.dumps({**row, "lr": float(optimizer.param_groups[-1]["lr"])}) + "\n")
            if improved:
                save_checkpoint(best_path, done)
    if epoch_end:
        epoch_loss_sum = 0.0
    stopping = stop.received()
    if master and (done == total_iters or stopping or time.time() - last_save >= save_last_every_s):
        save_checkpoint(last_path, done)
        last_save, last_saved = time.time(), done
    if stopping:
        break

stopped_early = stop.signum and last_log < total_iters  # a signal at the last log point changes nothing
if master and stopped_early:
    print(f"{stop.name()}: stopped at iteration {last_log} of {total_iters}; continue with --resume=True")
elif master:
    scores = scores or evaluate()  # a resumed run that had nothing left has not evaluated
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        for view, (top1, top5) in scores.items():
            f.write(json.dumps({"checkpoint": init, "pretrain_epoch": pretrain_epoch, "method": "finetune",
                                "recipe": f"{recipe}, {epochs} ep{data.view_label(view)}",
                                "top1": top1, "top5": top5, "best_top1": best_top1[view], "wall_s": train_time,
                                "hardware": runtime.hardware(device)}) + "\n")
            print(f"done{data.view_label(view)}: final top-1 {top1:.2f}% top-5 {top5:.2f}%, "
                  f"best top-1 {best_top1[view]:.2f}%")
    print(f"trained for {runtime.fmt_duration(train_time)}; results in {os.path.join(out_dir, 'results.jsonl')}")
runtime.cleanup()
sys.exit(stop.exit_code() if stopped_early else 0)
