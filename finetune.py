"""
Fine-tuning of a pre-trained MAE encoder, or of the same network from scratch, on Tiny ImageNet:

    python finetune.py config/ft_ref.py --init=out/tin/ckpt_700.pt   # the reference's recipe
    python finetune.py config/ft_tin.py --init=out/tin/ckpt_700.pt   # ours: the official MAE's tools
    python finetune.py config/ft_tin.py --init=scratch               # no pre-training
    python finetune.py config/ft_tin.py --init=... --resume=True      # continue out_dir/ckpt_last.pt
    torchrun --standalone --nproc_per_node=4 finetune.py config/ft_tin.py --init=...

The augmentation (crop, flip, RandAugment, random erasing, mixup and cutmix) runs on whole batches on the
device (data.py, augment.py). Top-1 and top-5 on the validation images every eval_every epochs, as they are
(64x64) and, with eval_resize > 0, in the reference's view (resized to 73, the central 64x64 crop). out_dir
gets ckpt_last.pt (refreshed every save_last_every_s and on Ctrl-C or SIGTERM), ckpt_best.pt (the best
plain-view top-1), finetune_log.jsonl (each evaluated epoch) and one line per view in results.jsonl.
"""
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import augment
import data
import probe
import runtime
from configurator import check_same_run, configure
from model import Classifier, ViTConfig, model_config, param_groups, pretrained_encoder

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/tin"
out_dir = "out/finetune"
init = "scratch"  # a pre-training checkpoint, or 'scratch' for the reference ViT-Lite from random weights
resume = False  # continue from out_dir/ckpt_last.pt
recipe = "ref"  # a name for the results table; its lines add the epochs, so a short run is a line of its own
log_interval = 50  # iterations between progress lines
save_last_every_s = 60.0  # refresh ckpt_last.pt when this many seconds have passed, at a log point
eval_every = 1  # epochs
eval_resize = 73  # also score the reference's view (resize to 73, central 64 crop); 0: the plain images only
eval_batch_size = 512
# model
pool = "cls"  # 'cls' token (the reference) or 'avg' of the patch tokens with a LayerNorm (official MAE)
head = "linear"  # or 'batchnorm': BatchNorm1d without affine parameters, then the Linear (the reference's)
drop_path = 0.0
# optimisation: the reference's recipe
batch_size = 128  # global, across all processes
epochs = 100
warmup_epochs = 5
blr = 1e-3  # lr = blr * batch_size / 256
weight_decay = 0.05
decay_all = False  # True: decay biases, norms and the cls token too, as the reference's code does
beta1 = 0.9
beta2 = 0.999
layer_decay = 1.0  # 1: every layer learns at the same rate
clip_grad = 0.0  # 0: no clipping
# augmentation
crop_scale = (0.08, 1.0)  # the random resized crop's share of the image's area
rand_augment_ops = 2
rand_augment_magnitude = 9
rand_augment_interpolation = "bicubic"  # its geometric ops' resampling, as the reference and the official MAE
mixup_mode = "batch"  # timm's Mixup: 'batch' (one draw for the batch, its default) or 'elem' (one per image)
reprob = 0.0  # random erasing probability
mixup = 0.0  # Beta alpha; 0 turns it off
cutmix = 0.0
label_smoothing = 0.0
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()  # the model and the augmentation's pixel work
cuda_graph = torch.cuda.is_available()  # replay each step as CUDA graphs (one process only)
attention = "auto"  # the kernel: 'auto', 'flash', 'efficient', 'cudnn', 'math' or 'encoder=..,decoder=..'
seed = 0
# -----------------------------------------------------------------------------

def make_step(model, optimizer, num_classes, device, dtype, compile=False, graphs=False, rank=0,
              world_size=1):
    """One training iteration, step(images_u8, labels, it) -> loss, on the global batch; bench.py times this
    same function. Every process draws the whole batch's augmentation from the RNG seeded by (seed, it) and
    augments what its slice needs: mixup pairs image i with image B-1-i, so its slice and the mirror slice,
    which holds their partners (one process: the same slice). The draws come first and eagerly: compiled
    code would draw other numbers. Drop path draws its own masks in each process."""
    local = batch_size // world_size
    mine = list(range(rank * local, (rank + 1) * local))
    mirror = [batch_size - 1 - i for i in reversed(mine)]
    rows = slice(mine[0], mine[-1] + 1) if mirror == mine else torch.tensor(mine + mirror, device=device)

    def transform(images_u8, labels, draws):
        images_u8, labels, (crop, rand_aug, erasing, mix) = data.rows_of((images_u8, labels, draws), rows)
        x = data.resized_crop_flip(data.to_float(images_u8), crop)  # (R, 3, H, W), 0..255
        x = augment.rand_augment(x, rand_aug, rand_augment_magnitude,
                                 interpolation=rand_augment_interpolation)
        x = data.normalize(x)
        if reprob > 0:
            x = augment.random_erasing(x, erasing, reprob)
        x, targets = augment.mixup_cutmix(x, labels, num_classes, mix, label_smoothing)
        return x[:local], targets[:local]  # (B/N, 3, H, W), (B/N, num_classes)
    transform = runtime.compiled(transform, compile)

    @torch.no_grad()
    def augment_batch(images_u8, labels):
        B, H, W, C = images_u8.shape
        crop = data.crop_flip_draws(B, crop_scale, device)  # drawn in the order the steps use them
        rand_aug = augment.rand_augment_draws(B, rand_augment_ops, device)
        erasing = augment.erasing_draws((B, C, H, W), device) if reprob > 0 else None
        mix = augment.mixup_draws(B, H, W, device, mixup, cutmix, mode=mixup_mode)
        return transform(images_u8, labels, (crop, rand_aug, erasing, mix))

    def update(x, targets):
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft targets
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if graphs:
        augment_batch, update = runtime.cuda_graphed(augment_batch), runtime.cuda_graphed(update, optimizer)

    def step(images_u8, labels, it):
        runtime.seed_step(seed, it)
        x, targets = augment_batch(images_u8, labels)
        runtime.seed_step(seed, it, stream=1 + rank)  # this process's own draws (drop path)
        return update(x, targets)
    step.augment = augment_batch  # bench.py checks and times it alone
    return step

if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    device, rank, world_size = runtime.setup(device, seed)
    graphs = runtime.use_cuda_graphs(cuda_graph, device, world_size)
    master = rank == 0
    last_path = runtime.start_out_dir(out_dir, resume, master)
    log_path, best_path = os.path.join(out_dir, "finetune_log.jsonl"), os.path.join(out_dir, "ckpt_best.pt")
    train_images, train_labels = data.load_split(data_dir, "train", device)
    val_images, val_labels = data.load_split(data_dir, "val", device, size=train_images.shape[1])
    num_classes = data.num_classes(data_dir)
    data.check_eval_resize(eval_resize, val_images.shape[1])
    data.check_batch(batch_size, world_size, len(train_images))
    iters_per_epoch = len(train_images) // batch_size
    total_iters = epochs * iters_per_epoch
    lr = blr * batch_size / 256

    # the model: the pre-trained encoder with a new head, or all random; a resumed run takes every weight
    # from ckpt_last.pt, so it needs no pre-training checkpoint (which may be gone by then)
    pretrain_epoch, ckpt, encoder = None, None, None
    if resume:
        ckpt = runtime.load_checkpoint(last_path, ("model", "optimizer", "iter_num"))
        check_same_run(ckpt, config, last_path, len(train_images))
        cfg = model_config(ckpt, last_path)
    elif init == "scratch":
        cfg = ViTConfig(img_size=train_images.shape[1])
    else:
        pre = runtime.load_checkpoint(init)
        encoder, cfg = pretrained_encoder(pre, init, train_images.shape[1])
        pretrain_epoch = pre.get("epoch")
        del pre
    model = Classifier(cfg, num_classes, pool, drop_path, head)
    if encoder is not None:
        model.encoder.load_state_dict(encoder.state_dict())
        del encoder
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay, decay_all), lr=lr,
                                  betas=(beta1, beta2), fused=device.startswith("cuda"))
    views = data.eval_views(eval_resize)
    iter_num, best_top1, train_time, epoch_loss_sum = 0, dict.fromkeys(views, 0.0), 0.0, 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        runtime.load_optimizer(optimizer, ckpt["optimizer"])
        iter_num, best_top1, train_time = ckpt["iter_num"], ckpt["best_top1"], ckpt["train_time"]
        epoch_loss_sum, pretrain_epoch = ckpt["epoch_loss_sum"], ckpt["pretrain_epoch"]
        if master:
            print(f"resuming {last_path} at iteration {iter_num}, epoch {iter_num / iters_per_epoch:.1f} of "
                  f"{epochs}")
        del ckpt
    if master:
        runtime.start_log(log_path, iter_num // iters_per_epoch)
    raw_model = model
    model = runtime.wrap(model, compile, device, world_size, attention, dtype)
    stop = runtime.StopSignal(device, master, last_path)  # Ctrl-C, SIGTERM: save, then stop
    stop.saved_iter = iter_num if resume else None
    if master:
        print(f"fine-tuning {'from scratch' if init == 'scratch' else init} ({pool} pool, {head} head, "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters) on "
              f"{len(train_images):,} images of {num_classes} classes, {iters_per_epoch} iterations per "
              f"epoch, {world_size} process(es), device {device}, {dtype}, CUDA graphs "
              f"{'on' if graphs else 'off'}, lr {lr:.2e}")
        runtime.warn_if_slow(device, (total_iters - iter_num) * batch_size)

    def get_lr(it):
        """Linear warm-up from 0, then half a cosine down to 0, per iteration (as the official MAE)."""
        warmup_iters = warmup_epochs * iters_per_epoch
        if it < warmup_iters:
            return lr * it / warmup_iters
        decay_ratio = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay_ratio)))

    def save_checkpoint(path, done):
        runtime.save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "model_args": asdict(cfg), "config": config, "num_train": len(train_images),
                             "iter_num": done, "best_top1": best_top1, "train_time": train_time,
                             "epoch_loss_sum": epoch_loss_sum, "pretrain_epoch": pretrain_epoch}, path)

    def evaluate():
        """{view: (top-1, top-5)} on the validation images; a BatchNorm head uses its running statistics."""
        raw_model.eval()
        logits = {view: probe.outputs(raw_model, val_images, dtype, eval_batch_size, resize_to=view)
                  for view in views}
        scores = {view: probe.top_k_accuracy(logits[view], val_labels) for view in views}
        raw_model.train()
        return scores

    # -------------------------------------------------------------------------
    # training loop
    train_step = make_step(model, optimizer, num_classes, device, dtype, compile, graphs, rank, world_size)
    window = torch.zeros(log_interval, device=device)  # the losses since the last log point, read only there
    last_log, saved_at, t_start = iter_num, time.time(), time.time() - train_time
    progress = runtime.Progress(total_iters, iter_num, batch_size)
    next_log = lambda: min(last_log + log_interval, (last_log // iters_per_epoch + 1) * iters_per_epoch,
                           total_iters)
    stop.next_log, scores = next_log(), None  # scores: {view: (top-1, top-5)} of the last evaluation
    for it in range(iter_num, total_iters):
        epoch, step = divmod(it, iters_per_epoch)
        if step == 0 or it == iter_num:
            perm = data.permutation(len(train_images), seed, epoch, device)
        runtime.set_lr(optimizer, get_lr(it))
        idx = perm[step * batch_size:(step + 1) * batch_size]
        window[it - last_log] = train_step(train_images[idx], train_labels[idx], it)

        done = it + 1
        epochs_done, into_epoch = divmod(done, iters_per_epoch)
        if done - last_log < log_interval and into_epoch:
            continue
        # a log point: the losses, a progress line, an evaluation at an epoch's end, ckpt_last.pt, a stop
        losses = runtime.checked_losses(window, done - last_log, last_log, raw_model, last_path,
                                        stop.saved_iter)
        epoch_loss_sum += sum(losses)
        last_log = done
        stop.next_log = next_log()  # for the stop notice
        train_time = time.time() - t_start
        if master:
            images_per_s, eta = progress.tick(done)
            print(f"epoch {done / iters_per_epoch:6.2f}/{epochs} | iter {done}/{total_iters} | loss "
                  f"{losses[-1]:.4f} | lr {get_lr(it):.2e} | {images_per_s:,.0f} img/s | ETA "
                  f"{runtime.fmt_duration(eta)}", flush=True)
        if into_epoch == 0 and (epochs_done % eval_every == 0 or epochs_done == epochs):
            scores = evaluate()
            improved = scores[0][0] > best_top1[0]
            best_top1 = {view: max(best_top1[view], scores[view][0]) for view in views}
            if master:
                print(f"epoch {epochs_done}: validation " + "; ".join(
                    f"{f'resized to {view}' if view else 'plain'}: top-1 {top1:.2f}% top-5 {top5:.2f}% "
                    f"(best {best_top1[view]:.2f}%)" for view, (top1, top5) in scores.items()), flush=True)
                row = {"epoch": epochs_done, "loss": epoch_loss_sum / iters_per_epoch, "lr": get_lr(it)}
                for view, (top1, top5) in scores.items():
                    suffix = f"_resize{view}" if view else ""  # top1, top5 and top1_resize73, top5_resize73
                    row.update({f"top1{suffix}": top1, f"top5{suffix}": top5})
                runtime.append_jsonl(log_path, row)
                if improved:
                    save_checkpoint(best_path, done)
        if into_epoch == 0:
            epoch_loss_sum = 0.0
        stopping = stop.received()
        if master and (done == total_iters or stopping or time.time() - saved_at >= save_last_every_s):
            save_checkpoint(last_path, done)
            saved_at, stop.saved_iter = time.time(), done
        if stopping:
            break

    stopped_early = stop.signum and last_log < total_iters  # a signal at the last log point changes nothing
    if master and stopped_early:
        print(f"{stop.name()}: stopped at iteration {last_log} of {total_iters}; continue with --resume=True")
    elif master:
        scores = scores or evaluate()  # a resumed run that had nothing left has not evaluated
        for view, (top1, top5) in scores.items():
            runtime.append_jsonl(os.path.join(out_dir, "results.jsonl"), {
                "checkpoint": init, "pretrain_epoch": pretrain_epoch, "method": "finetune",
                "recipe": f"{recipe}, {epochs} ep{data.view_label(view)}", "top1": top1, "top5": top5,
                "best_top1": best_top1[view], "wall_s": train_time, "hardware": runtime.hardware(device)})
            print(f"done{data.view_label(view)}: final top-1 {top1:.2f}% top-5 {top5:.2f}%, "
                  f"best top-1 {best_top1[view]:.2f}%")
        print(f"trained for {runtime.fmt_duration(train_time)}; results in {out_dir}/results.jsonl")
    runtime.cleanup()
    sys.exit(stop.exit_code() if stopped_early else 0)
