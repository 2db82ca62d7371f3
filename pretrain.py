"""
MAE pre-training of ViT-Lite on Tiny ImageNet. One GPU:

    python pretrain.py config/tin.py

several GPUs (the configured batch is the global one, split across the processes):

    torchrun --standalone --nproc_per_node=4 pretrain.py config/tin.py

a quick run on the CPU (pack the 10-class subset first, see README.md):

    python pretrain.py config/tin_cpu.py

The whole training set sits on the device as uint8; every step crops, flips and masks a batch with
tensor ops. Output in out_dir: ckpt_{epoch}.pt every save_every epochs, ckpt_last.pt for resuming
(--init_from=resume), log.jsonl (mean loss per epoch), loss.png and recon_{epoch}.png. Ctrl-C or
SIGTERM saves ckpt_last.pt at the next progress line and stops there.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import data
import plot
import runtime
import steps
from configurator import check_same_run, configure
from model import MAE, ViTConfig

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/tin"
out_dir = "out/tin"
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt_last.pt)
save_every = 100  # epochs between kept checkpoints ckpt_{epoch}.pt
save_last_every_s = 60.0  # refresh ckpt_last.pt when this many seconds have passed (at a log point)
log_interval = 50  # iterations between progress lines
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
norm_pix_loss = True
# optimisation
batch_size = 256  # global, across all processes
epochs = 1200
warmup_epochs = 20
blr = 5e-4  # lr = blr * batch_size / 256
weight_decay = 0.15
beta1 = 0.9
beta2 = 0.95
crop_scale = (0.2, 1.0)  # random resized crop's area range
max_iters = 0  # stop after this many iterations in all, without changing the schedule (0: all epochs)
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
if init_from not in ("scratch", "resume"):
    raise SystemExit(f"error: init_from must be 'scratch' or 'resume', not {init_from!r}")
if master:
    runtime.make_out_dir(out_dir)
log_path, last_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "ckpt_last.pt")
if init_from == "scratch" and os.path.exists(last_path):  # a fresh run would overwrite its resume point
    raise SystemExit(f"error: {out_dir} already holds a run ({last_path}): continue it with --init_from=resume, "
                     f"or give another out_dir")

train_images, _ = data.load_split(data_dir, "train", device)
val_images, _ = data.load_split(data_dir, "val", device, size=train_images.shape[1])
if train_images.shape[1] % patch_size:
    raise SystemExit(f"error: patch_size={patch_size} does not divide the {train_images.shape[1]}px images")
iters_per_epoch = len(train_images) // batch_size  # the last partial batch of an epoch is dropped
if iters_per_epoch == 0:
    raise SystemExit(f"error: batch_size={batch_size} is larger than the training set ({len(train_images)})")
total_iters = epochs * iters_per_epoch
end_iter = min(total_iters, max_iters) if max_iters > 0 else total_iters
lr = blr * batch_size / 256

# model and optimizer, fresh or from ckpt_last.pt
ckpt = None
if init_from == "resume":
    ckpt = runtime.load_checkpoint(last_path, ("model", "optimizer", "model_args", "iter_num"))
    check_same_run(ckpt, config, last_path, len(train_images))
    cfg = runtime.model_config(ckpt, last_path)
else:
    cfg = ViTConfig(img_size=train_images.shape[1], patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, decoder_embed_dim=decoder_embed_dim,
                    decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads)
model = MAE(cfg, norm_pix_loss).to(device)
optimizer = torch.optim.AdamW(runtime.param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2),
                              fused=device.startswith("cuda"))
iter_num, epoch_loss_sum, last_saved = 0, 0.0, None  # last_saved: the iteration ckpt_last.pt holds
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
    runtime.load_optimizer(optimizer, ckpt["optimizer"])
    iter_num, epoch_loss_sum = ckpt["iter_num"], ckpt["epoch_loss_sum"]
    last_saved = iter_num
    if master:
        runtime.truncate_log(log_path, iter_num // iters_per_epoch)
    del ckpt
elif master and os.path.exists(log_path):
    os.remove(log_path)
raw_model = model
runtime.pin_attention(model, attention, device, dtype)
model = runtime.wrap_model(model, compile, device, world_size)
stop = runtime.StopSignal(device)  # from here on Ctrl-C and SIGTERM stop at a log point, saved
if master:
    print(f"MAE {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters "
          f"(encoder {sum(p.numel() for p in raw_model.encoder.parameters()) / 1e6:.2f}M), "
          f"{len(train_images):,} training images, {iters_per_epoch} iterations per epoch, "
          f"{world_size} process(es), device {device}, {dtype}, CUDA graphs {'on' if graphs else 'off'}, "
          f"attention {attention}, lr {lr:.2e}")

# fixed validation images and masks for the reconstruction pictures
picture_ids = torch.linspace(0, len(val_images) - 1, 8).long()
picture_noise = torch.rand(8, cfg.num_patches, generator=torch.Generator().manual_seed(0)).to(device)


def save_checkpoint(path, done, epoch_loss_sum):
    # the RNG needs no saving: every step re-seeds it from (seed, iteration)
    runtime.save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "model_args": asdict(cfg), "num_train": len(train_images), "norm_pix_loss": norm_pix_loss,
                         "iter_num": done, "epoch": done / iters_per_epoch, "epoch_loss_sum": epoch_loss_sum,
                         "config": config}, path)


def save_pictures(epochs_done):
    imgs = data.normalize(data.to_float(val_images[picture_ids]))
    raw_model.eval()
    masked, recon, pasted = raw_model.reconstruct(imgs, picture_noise, mask_ratio)
    raw_model.train()
    plot.save_reconstructions([imgs, masked, recon, pasted], os.path.join(out_dir, f"recon_{epochs_done}.png"),
                              f"MAE reconstructions of validation images after {epochs_done} epochs")
    plot.plot_loss(log_path, os.path.join(out_dir, "loss.png"))


# -----------------------------------------------------------------------------
# training loop
train_step = steps.make_pretrain_step(model, optimizer, num_patches=cfg.num_patches, batch_size=batch_size,
                                      rank=rank, world_size=world_size, seed=seed, crop_scale=crop_scale,
                                      mask_ratio=mask_ratio, device=device, dtype=dtype,
                                      compile=compile, cuda_graph=graphs)
window = torch.zeros(log_interval, device=device)  # losses since the last log point, read only there
last_log, last_save = iter_num, time.time()
progress = runtime.Progress(end_iter, iter_num, batch_size)
perm = None
for it in range(iter_num, end_iter):
    epoch, step = divmod(it, iters_per_epoch)
    if perm is None or step == 0:
        perm = data.permutation(len(train_images), seed, epoch, device)
    runtime.set_lr(optimizer, runtime.cosine_lr(it, lr, warmup_epochs * iters_per_epoch, total_iters))
    window[it - last_log] = train_step(train_images[perm[step * batch_size:(step + 1) * batch_size]], it)

    done = it + 1
    epochs_done, into_epoch = divmod(done, iters_per_epoch)
    epoch_end = into_epoch == 0
    keep = epoch_end and (epochs_done % save_every == 0 or epochs_done == epochs)  # a ckpt_{epoch}.pt
    if done - last_log < log_interval and not epoch_end and done < end_iter:
        continue
    losses = runtime.finite_losses(window, done - last_log, last_log, raw_model, last_path, last_saved)
    epoch_loss_sum += sum(losses)
    last_log = done
    if master:
        images_per_s, eta = progress.tick(done)
        print(f"epoch {done / iters_per_epoch:7.2f}/{epochs} | iter {done}/{end_iter} | loss {losses[-1]:.4f} | "
              f"lr {float(optimizer.param_groups[0]['lr']):.2e} | {images_per_s:,.0f} img/s | "
              f"ETA {runtime.fmt_duration(eta)}", flush=True)
    if epoch_end:
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"epoch": epochs_done, "loss": epoch_loss_sum / iters_per_epoch,
                                    "lr": float(optimizer.param_groups[0]["lr"]), "time": time.time()}) + "\n")
        epoch_loss_sum = 0.0
    if master and keep:
        save_checkpoint(os.path.join(out_dir, f"ckpt_{epochs_done}.pt"), done, epoch_loss_sum)
        save_pictures(epochs_done)
    stopping = stop.received()
    if master and (keep or done == end_iter or stopping or time.time() - last_save >= save_last_every_s):
        save_checkpoint(last_path, done, epoch_loss_sum)
        last_save, last_saved = time.time(), done
    if stopping:
        break

stopped_early = stop.signum and last_log < end_iter  # a signal at the last log point changes nothing
if master and stopped_early:
    print(f"{stop.name()}: stopped at iteration {last_log} of {end_iter}; continue with --init_from=resume")
elif master:
    print(f"done: at iteration {last_log} of {total_iters}, checkpoints in {out_dir}")  # a resume past max_iters trains none
runtime.cleanup()
sys.exit(stop.exit_code() if stopped_early else 0)
