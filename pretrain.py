"""
MAE pre-training of ViT-Lite on Tiny ImageNet:

    python pretrain.py config/tin.py                   # the protocol on one GPU: 1200 epochs
    python pretrain.py config/tin.py --resume=True     # continue out_dir/ckpt_last.pt
    python pretrain.py config/tin_cpu.py               # a few minutes on a CPU, on the 10-class pack
    torchrun --standalone --nproc_per_node=4 pretrain.py config/tin.py   # batch_size stays the global batch

The training set sits on the device as uint8; every iteration crops, flips and masks a batch there with
tensor ops (data.py), runs the MAE (model.py) and one AdamW update. out_dir gets log.jsonl (each epoch's mean
loss, and the k-NN top-1 where measured), loss.png, ckpt_last.pt (the whole state: refreshed every
save_last_every_s seconds and on Ctrl-C or SIGTERM) and, every save_every epochs, ckpt_{epoch}.pt (the
weights) and recon_{epoch}.png.
"""
import math
import os
import sys
import time
from dataclasses import asdict

import torch

import data
import plot
import probe
import reconstruct
import runtime
from configurator import check_same_run, configure
from model import MAE, ViTConfig, model_config, param_groups

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/tin"
out_dir = "out/tin"
resume = False  # continue from out_dir/ckpt_last.pt
save_every = 100  # epochs between kept checkpoints ckpt_{epoch}.pt (weights only)
save_last_every_s = 60.0  # refresh ckpt_last.pt when this many seconds have passed, at a log point
log_interval = 50  # iterations between progress lines
# the k-NN monitor: probe.py's weighted k-NN top-1 of the encoder's cls token, at every kept checkpoint
knn_every = 100  # and every this many epochs; 0 turns the monitor off
knn_k = 20
knn_temperature = 0.07
knn_train_images = 0  # neighbours among this many training images (a fixed, seeded subset); 0: all
eval_batch_size = 512
# model (the reference's ViT-Lite; a resumed run takes its model from the checkpoint)
patch_size = 4
embed_dim = 256
depth = 7
num_heads = 4
mlp_ratio = 2.0
decoder_embed_dim = 128
decoder_depth = 2
decoder_num_heads = 4
mask_ratio = 0.75
norm_pix_loss = True  # the target: each patch's pixels normalised by their own mean and spread
# optimisation
batch_size = 256  # global, across all processes
epochs = 1200
warmup_epochs = 20
blr = 5e-4  # lr = blr * batch_size / 256
weight_decay = 0.15
decay_all = False  # True: decay biases and norms too, as the reference's code does
beta1 = 0.9
beta2 = 0.95
random_crop = True  # random resized crop (crop_scale) before the flip; False: flip only
crop_scale = (0.2, 1.0)  # the crop's share of the image's area
max_iters = 0  # stop after this many iterations in all, without changing the schedule (0: all epochs)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()  # the model and the augmentation's pixel work
cuda_graph = torch.cuda.is_available()  # replay each step as CUDA graphs (one process only)
attention = "auto"  # the kernel: 'auto', 'flash', 'efficient', 'cudnn', 'math' or 'encoder=..,decoder=..'
seed = 0
# -----------------------------------------------------------------------------

def make_step(model, optimizer, device, dtype, compile=False, graphs=False, rank=0, world_size=1):
    """One training iteration, step(images_u8, it) -> loss, on the global batch (B, H, W, 3) uint8; bench.py
    times this same function. Every process draws the whole batch's crops, flips and masks from the RNG
    seeded by (seed, it) and augments only its slice: N processes train as one, and a resumed run repeats an
    uninterrupted one. The draws come first and eagerly, so a compiled crop sees the same numbers."""
    local = batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)
    view = data.resized_crop_flip if random_crop else data.flip_only
    crop = runtime.compiled(lambda images, draws: data.normalize(view(data.to_float(images), draws)), compile)

    @torch.no_grad()  # in fp32, outside autocast
    def augment(images_u8):
        B, H = images_u8.shape[:2]
        draws = data.crop_flip_draws(B, crop_scale, device)
        noise = torch.rand(B, (H // patch_size) ** 2, device=device)  # (B, L): each image's mask
        return crop(*data.rows_of((images_u8, draws), mine)), noise[mine]  # (B/N, 3, H, W), (B/N, L)

    def update(imgs, noise):
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
            loss, _, _ = model(imgs, mask_ratio, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if graphs:
        augment, update = runtime.cuda_graphed(augment), runtime.cuda_graphed(update, optimizer)

    def step(images_u8, it):
        runtime.seed_step(seed, it)
        return update(*augment(images_u8))
    step.augment = augment  # bench.py checks and times it alone
    return step

if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    device, rank, world_size = runtime.setup(device, seed)
    graphs = runtime.use_cuda_graphs(cuda_graph, device, world_size)
    master = rank == 0
    last_path, log_path = runtime.start_out_dir(out_dir, resume, master), os.path.join(out_dir, "log.jsonl")

    train_images, train_labels = data.load_split(data_dir, "train", device)
    val_images, val_labels = data.load_split(data_dir, "val", device, size=train_images.shape[1])
    num_classes = data.num_classes(data_dir)
    data.check_batch(batch_size, world_size, len(train_images))
    if train_images.shape[1] % patch_size:
        raise SystemExit(f"error: patch_size={patch_size} does not divide {train_images.shape[1]}px images")
    if knn_every:  # the training images the k-NN's neighbours come from
        knn_ids = probe.knn_subset(knn_train_images, len(train_images), knn_k, seed, device)
    iters_per_epoch = len(train_images) // batch_size  # the last partial batch of an epoch is dropped
    total_iters = epochs * iters_per_epoch
    end_iter = min(total_iters, max_iters) if max_iters > 0 else total_iters
    lr = blr * batch_size / 256

    # the model and the optimizer, fresh or as ckpt_last.pt left them
    ckpt = runtime.load_checkpoint(last_path, ("model", "optimizer", "iter_num")) if resume else None
    if ckpt:
        check_same_run(ckpt, config, last_path, len(train_images))
        cfg = model_config(ckpt, last_path)
    else:
        cfg = ViTConfig(img_size=train_images.shape[1], patch_size=patch_size, embed_dim=embed_dim,
                        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                        decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                        decoder_num_heads=decoder_num_heads)
    model = MAE(cfg, norm_pix_loss).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, decay_all=decay_all), lr=lr,
                                  betas=(beta1, beta2), fused=device.startswith("cuda"))
    iter_num, epoch_loss_sum = 0, 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        runtime.load_optimizer(optimizer, ckpt["optimizer"])
        iter_num, epoch_loss_sum = ckpt["iter_num"], ckpt["epoch_loss_sum"]
        if master:
            print(f"resuming {last_path} at iteration {iter_num}, epoch {iter_num / iters_per_epoch:.1f} of "
                  f"{epochs}")
        del ckpt
    if master:
        runtime.start_log(log_path, iter_num // iters_per_epoch)
    raw_model = model
    model = runtime.wrap(model, compile, device, world_size, attention, dtype)
    stop = runtime.StopSignal(device, master, last_path)  # Ctrl-C, SIGTERM: save, then stop
    stop.saved_iter = iter_num if resume else None  # the iteration ckpt_last.pt holds
    if master:
        print(f"MAE {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters "
              f"(encoder {sum(p.numel() for p in raw_model.encoder.parameters()) / 1e6:.2f}M), "
              f"{len(train_images):,} training images, {iters_per_epoch} iterations per epoch, {world_size} "
              f"process(es), device {device}, {dtype}, CUDA graphs {'on' if graphs else 'off'}, lr {lr:.2e}")
        runtime.warn_if_slow(device, (end_iter - iter_num) * batch_size)

    def get_lr(it):
        """Linear warm-up from 0, then half a cosine down to 0, per iteration (as the official MAE)."""
        warmup_iters = warmup_epochs * iters_per_epoch
        if it < warmup_iters:
            return lr * it / warmup_iters
        decay_ratio = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay_ratio)))

    def save_checkpoint(path, done, **more):
        """The weights, what made them and how far: a kept ckpt_{epoch}.pt. ckpt_last.pt adds what a resume
        needs (not the RNG: every step re-seeds it from the seed and the iteration)."""
        runtime.save_atomic({"model": raw_model.state_dict(), "model_args": asdict(cfg), "config": config,
                             "iter_num": done, "epoch": done / iters_per_epoch, **more}, path)

    def monitor_knn():
        """probe.py's k-NN top-1 of the encoder's cls token on the validation images (rank 0's work). It costs
        30-38 s on 2 CPU cores for config/tin_cpu.py on the 10-class pack (5,500 images through a 0.54M
        encoder), and on a GPU a few seconds by arithmetic (110,000 images, about 260 TFLOP; not measured)."""
        t0, encoder = time.time(), raw_model.encoder.eval()
        f = lambda images: probe.encode(encoder, images, "cls", dtype, eval_batch_size)
        votes = probe.knn_scores(f(train_images[knn_ids]), train_labels[knn_ids], f(val_images), num_classes,
                                 knn_k, knn_temperature)
        top1 = probe.top_k_accuracy(votes, val_labels)[0]
        encoder.train()
        print(f"k-NN top-1 {top1:.1f}% ({knn_k}-NN, {time.time() - t0:.0f} s)", flush=True)
        return top1

    # fixed validation images and masks for the reconstruction pictures
    picture_ids = torch.linspace(0, len(val_images) - 1, 8).long()
    picture_noise = torch.rand(8, cfg.num_patches, generator=torch.Generator().manual_seed(0)).to(device)

    def save_pictures(epochs_done):
        imgs = data.normalize(data.to_float(val_images[picture_ids]))
        rows = reconstruct.pictures(raw_model.eval(), imgs, picture_noise, mask_ratio)
        raw_model.train()
        reconstruct.save_pictures(rows, os.path.join(out_dir, f"recon_{epochs_done}.png"), f"{out_dir} after "
                                  f"{epochs_done} epochs: validation images, {mask_ratio:.0%} masked")
        plot.plot_loss(log_path, os.path.join(out_dir, "loss.png"))

    # -------------------------------------------------------------------------
    # training loop
    train_step = make_step(model, optimizer, device, dtype, compile, graphs, rank, world_size)
    window = torch.zeros(log_interval, device=device)  # the losses since the last log point, read only there
    last_log, saved_at = iter_num, time.time()
    progress = runtime.Progress(end_iter, iter_num, batch_size)
    next_log = lambda: min(last_log + log_interval, (last_log // iters_per_epoch + 1) * iters_per_epoch,
                           end_iter)
    stop.next_log = next_log()  # for the stop notice
    for it in range(iter_num, end_iter):
        epoch, step = divmod(it, iters_per_epoch)
        if step == 0 or it == iter_num:
            perm = data.permutation(len(train_images), seed, epoch, device)
        runtime.set_lr(optimizer, get_lr(it))
        window[it - last_log] = train_step(train_images[perm[step * batch_size:(step + 1) * batch_size]], it)

        done = it + 1
        epochs_done, into_epoch = divmod(done, iters_per_epoch)
        if done - last_log < log_interval and into_epoch and done < end_iter:
            continue
        # a log point: the losses, a progress line, the epoch's log line, checkpoints, a stop if asked
        losses = runtime.checked_losses(window, done - last_log, last_log, raw_model, last_path,
                                        stop.saved_iter)
        epoch_loss_sum += sum(losses)
        last_log = done
        stop.next_log = next_log()  # for the stop notice
        keep = into_epoch == 0 and (epochs_done % save_every == 0 or epochs_done == epochs)
        if master:
            images_per_s, eta = progress.tick(done)
            print(f"epoch {done / iters_per_epoch:7.2f}/{epochs} | iter {done}/{end_iter} | loss "
                  f"{losses[-1]:.4f} | lr {get_lr(it):.2e} | {images_per_s:,.0f} img/s | ETA "
                  f"{runtime.fmt_duration(eta)}", flush=True)
        if into_epoch == 0:
            measure = master and knn_every and (keep or epochs_done % knn_every == 0)
            knn_top1 = monitor_knn() if measure else None
            if master:
                loss = epoch_loss_sum / iters_per_epoch
                runtime.append_jsonl(log_path, {"epoch": epochs_done, "loss": loss, "lr": get_lr(it),
                                                "time": time.time(), "knn_top1": knn_top1})
            epoch_loss_sum = 0.0
        if master and keep:
            save_checkpoint(os.path.join(out_dir, f"ckpt_{epochs_done}.pt"), done, knn_top1=knn_top1)
            save_pictures(epochs_done)
        stopping = stop.received()
        if master and (keep or done == end_iter or stopping or time.time() - saved_at >= save_last_every_s):
            save_checkpoint(last_path, done, optimizer=optimizer.state_dict(), epoch_loss_sum=epoch_loss_sum,
                            num_train=len(train_images))
            saved_at, stop.saved_iter = time.time(), done
        if stopping:
            break

    stopped_early = stop.signum and last_log < end_iter  # a signal at the last log point changes nothing
    if master and stopped_early:
        print(f"{stop.name()}: stopped at iteration {last_log} of {end_iter}; continue with --resume=True")
    elif master:  # a resume past max_iters trains none
        print(f"done: at iteration {last_log} of {total_iters}, checkpoints in {out_dir}")
    runtime.cleanup()
    sys.exit(stop.exit_code() if stopped_early else 0)
