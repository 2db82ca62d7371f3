"""
The small pieces every stage script shares: devices and torchrun, mixed precision, the warm-up +
cosine schedule, AdamW parameter groups, checkpoints written atomically and read with clear errors,
and progress lines with an ETA.
"""
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# devices, torchrun, precision


def setup_device(device, dtype, seed):
    """Start torch.distributed when launched by torchrun (NCCL on GPUs, Gloo on CPUs) and check the
    device and dtype settings. Returns (device, rank, world_size)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: device={device!r} but CUDA is not available; use --device=cpu")
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"error: dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    rank, world_size = 0, 1
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    torch.manual_seed(seed)  # the same initial weights on every rank
    return device, rank, world_size


def autocast(device, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def seed_step(seed, it, stream=0):
    """Re-seed the global RNG from the iteration, so the random draws depend only on (seed,
    iteration, stream): a resumed run draws exactly what an uninterrupted one would have."""
    torch.manual_seed((seed * 1_000_003 + it) * 1024 + stream)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# optimisation


def cosine_lr(it, peak_lr, warmup_iters, total_iters):
    """Linear warm-up from 0, then half a cosine down to 0, per iteration (as the official MAE)."""
    if it < warmup_iters:
        return peak_lr * it / warmup_iters
    progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay, skip=()):
    """No weight decay on biases, norms and other 1-D parameters, nor on the names in skip."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# checkpoints


def save_atomic(obj, path):
    """torch.save through a temporary file, so a kill never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, needed=("model", "model_args")):
    """A checkpoint dict, or one clear line naming what is wrong with the file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (it needs {', '.join(needed)})")
    return ckpt


# -----------------------------------------------------------------------------
# progress


def fmt_duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Images/s and ETA from the wall time between log points (each log point syncs the device)."""

    def __init__(self, total_iters, start_iter, images_per_iter):
        self.total, self.images_per_iter = total_iters, images_per_iter
        self.t0 = self.last_t = time.time()
        self.first = self.last_it = start_iter

    def tick(self, it):
        """(images/s since the last call, ETA in seconds) at iteration it."""
        now = time.time()
        rate = (it - self.last_it) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_it = now, it
        overall = (it - self.first) / max(now - self.t0, 1e-9)  # steadier for the ETA
        eta = (self.total - it) / max(overall, 1e-9)
        return rate * self.images_per_iter, eta
