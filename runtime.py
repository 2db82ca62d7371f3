"""
Mechanism the stage scripts share, none of it needed to follow how the model learns: torchrun, CUDA-graph
replay, checkpoint files (written atomically, read with clear errors), Ctrl-C and SIGTERM, the progress line.
"""
import atexit
import json
import math
import os
import signal
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Attention

# -----------------------------------------------------------------------------
# devices and torchrun

def setup(device, seed):
    """Start torch.distributed under torchrun (NCCL on GPUs, Gloo on CPUs): (device, rank, world_size)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: device={device!r} but CUDA is not available; use --device=cpu")
    rank, world_size = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    torch.manual_seed(seed)  # the same initial weights in every process
    return device, rank, world_size

def wrap(model, compile, device, world_size, attention="auto", dtype="float32"):
    """The module the training step calls: its attention kernel pinned, compiled, in DDP under torchrun."""
    pin_attention(model, attention, device, dtype)
    model = torch.compile(model) if compile else model
    if world_size > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    return model

ATTENTION_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

def pin_attention(model, spec, device, dtype):
    """The kernel scaled_dot_product_attention runs: 'auto' (PyTorch picks), one of ATTENTION_KERNELS, or one
    per part, 'encoder=efficient,decoder=cudnn' (the fastest depends on the sequence length and width)."""
    kernels = {}
    for part in spec.split(",") if spec != "auto" else []:
        where, _, name = part.rpartition("=")  # the configurator has checked the names
        q = torch.zeros(1, 1, 8, 64, device=device, dtype=getattr(torch, dtype))  # fail here, not in step 1
        try:
            with sdpa_kernel(ATTENTION_KERNELS[name]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PyTorch's reasons, one warning each: the error says enough
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError:
            raise SystemExit(f"error: attention={spec!r}: the {name} kernel does not run on {device} in "
                             f"{dtype}")
        kernels[where] = ATTENTION_KERNELS[name]
    for module_name, module in model.named_modules():
        if isinstance(module, Attention):
            part = "decoder" if module_name.startswith("decoder") else "encoder"
            module.kernel = kernels.get(part, kernels.get(""))

def compiled(fn, compile):
    # whole graph, static shapes: the augmentation has no data-dependent control flow
    return torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn

def seed_step(seed, it, stream=0):
    """Seed the RNG from the iteration: a resumed run draws exactly what an uninterrupted one would have."""
    torch.manual_seed((seed * 1_000_003 + it) * 1024 + stream)

def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()

def hardware(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), PyTorch {torch.__version__}"

def warn_if_slow(device, images):
    """A GPU-sized run started on a CPU says so at once."""
    if not device.startswith("cuda") and images > 5_000_000:
        print(f"warning: {images:,} training images on the CPU take days; for a quick look run "
              f"config/tin_cpu.py on the 10-class pack (README.md)", flush=True)

# -----------------------------------------------------------------------------
# CUDA graphs: a step is hundreds of small kernels, and launching them one by one from Python costs far more
# than running them. Recorded once as CUDA graphs (the augmentation, the update), a step is two launches.

def use_cuda_graphs(cuda_graph, device, world_size):
    """Asked for, on a GPU, and in one process (under torchrun DDP's all-reduce runs between the kernels)."""
    if cuda_graph and not device.startswith("cuda"):
        raise SystemExit(f"error: cuda_graph=True needs a CUDA device, not device={device!r}")
    return cuda_graph and world_size == 1

def cuda_graphed(fn, optimizer=None, warmup=2):
    """fn(*tensors) -> tensors, run eagerly `warmup` times (to compile and allocate), then recorded as a CUDA
    graph and replayed: the arguments are copied into fixed memory, and the same output tensors come back,
    overwritten by the next replay. Random ops draw what eager ones would: the graph reads the generator's
    seed and offset at launch. An optimizer stepped in fn is made capturable: its lr a tensor on the device
    (set_lr fills it), its step counters on the device."""
    for group in optimizer.param_groups if optimizer else []:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)
    graph, static_args, static_out, calls = None, None, None, 0
    side = torch.cuda.Stream()

    def call(*args):
        nonlocal graph, static_args, static_out, calls
        if calls < warmup:  # on a side stream, as torch.cuda.graph's documentation asks
            calls += 1
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn(*args)
            torch.cuda.synchronize()
            return out
        if graph is None:  # recording runs nothing: the replay below does the work
            static_args, graph = [a.clone() for a in args], torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(*static_args)
        for static, a in zip(static_args, args):
            static.copy_(a)
        graph.replay()
        return static_out
    return call

def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)  # lr_scale: layer-wise decay in fine-tuning
        if torch.is_tensor(group["lr"]):  # a CUDA graph's AdamW reads it from device memory
            group["lr"].fill_(value)
        else:
            group["lr"] = value

# -----------------------------------------------------------------------------
# files

def start_out_dir(out_dir, resume, master):
    """out_dir made by rank 0 before any work; starting afresh over a run would overwrite its resume point."""
    last_path = os.path.join(out_dir, "ckpt_last.pt")
    if master:
        make_out_dir(out_dir)
    if not resume and os.path.exists(last_path):
        raise SystemExit(f"error: {out_dir} already holds a run ({last_path}): continue it with "
                         f"--resume=True, or give another out_dir")
    return last_path

def make_out_dir(path):
    """Make out_dir before any work, so a path that cannot be made fails at once; the folders made here go
    again at exit if nothing was written into them (a start that failed leaves no empty folder)."""
    made, parent = [], os.path.abspath(path)
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot make out_dir={path!r}: {e.strerror}")
    atexit.register(remove_empty, made)  # deepest first

def remove_empty(folders):
    for folder in folders:
        try:
            os.rmdir(folder)  # only if empty
        except OSError:
            return

def save_atomic(obj, path):
    """torch.save through a temporary file: a kill or a second Ctrl-C never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_checkpoint(path, needed=("model", "model_args")):
    """A checkpoint dict, or one clear line naming what is wrong with the file."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors alike: the file is not ours
        raise SystemExit(f"error: {path} is not a checkpoint torch.load(weights_only=True) can read "
                         f"({type(e).__name__})")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (it needs {', '.join(needed)})")
    return ckpt

def load_optimizer(optimizer, state):
    """load_state_dict, keeping this run's own way of stepping (fused, capturable) and a float lr: the state
    of a CUDA-graph run resumes anywhere."""
    own = [{k: group[k] for k in ("fused", "capturable", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings, lr=float(group["lr"]))

def append_jsonl(path, *rows):
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)

def start_log(path, epochs_done):
    """A fresh run's log starts empty; a resumed run's forgets the lines of the epochs it trains again, and a
    line a kill -9 cut short."""
    def epoch_of(line):
        try:
            return json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if epoch_of(line) <= epochs_done]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# log points: the losses, Ctrl-C and SIGTERM, the progress line

def checked_losses(window, count, first_iter, model, last_path, saved_iter):
    """The `count` losses since the last log point (the host's one wait for the device), the processes' mean
    under torchrun. A loss that is not finite, or weights that are not (the last update's, which no loss has
    checked), stop the run before anything is saved, saying what ckpt_last.pt holds (saved_iter)."""
    if dist.is_initialized():
        dist.all_reduce(window)
        window /= dist.get_world_size()
    losses = window[:count].tolist()
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is None and torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
        return losses
    what, bad_iter = (f"loss is {losses[bad]} at", first_iter + bad) if bad is not None else \
        ("the weights are not finite after", first_iter + count)
    if saved_iter is None:
        kept = f"this run has not saved {os.path.basename(last_path)} yet"
    elif saved_iter < bad_iter:  # its own loss was checked: finite
        kept = f"{last_path} keeps the last good state (iteration {saved_iter})"
    else:
        kept = f"{last_path} holds the state that gave it (iteration {saved_iter}): start again with other " \
               f"settings"
    raise SystemExit(f"error: {what} iteration {bad_iter}; {kept}")

class StopSignal:
    """Ctrl-C or SIGTERM (`timeout`, a scheduler) asks the loop to save ckpt_last.pt at its next log point and
    stop there, losing nothing; a second one, a second or more later, stops at once and leaves the last saved
    ckpt_last.pt. Under torchrun the processes agree at each log point and stop at the same iteration. The
    loop keeps next_log and saved_iter up to date for the notices."""

    def __init__(self, device, master, last_path):
        self.device, self.master, self.last_path = device, master, last_path
        self.next_log = self.saved_iter = None
        self.asked, self.asked_at, self.signum, self.work = 0, 0.0, 0, None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.ask)

    def say(self, text):  # os.write, not print: the signal may have interrupted a print
        if self.master:
            os.write(1, f"{text}\n".encode())

    def ask(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.asked:
            self.asked, self.asked_at = signum, time.monotonic()
            self.say(f"{name}: saving {self.last_path} at iteration {self.next_log} (the next progress "
                     f"line), then stopping; Ctrl-C again to stop now")
        elif time.monotonic() - self.asked_at > 1.0:  # torchrun passes a terminal's Ctrl-C on: the same one
            held = "nothing yet" if self.saved_iter is None else f"iteration {self.saved_iter}"
            self.say(f"{name} again: stopped now; {self.last_path} holds {held}, continue with --resume=True")
            raise SystemExit(128 + signum)

    def received(self):
        """At a log point: whether to save and stop, the same answer in every process."""
        signum = self.asked  # read once: a signal landing during the all-reduce counts at the next log point
        if dist.is_initialized():
            flag = torch.tensor([signum], device=self.device)
            # kept until the next call: Gloo's worker thread dropping the last reference while Python shuts
            # down would abort the process (pytorch/pytorch#179291)
            self.work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
            self.work.wait()
            signum = int(flag.item())
        self.signum = signum
        return signum != 0

    def name(self):
        return signal.Signals(self.signum).name

    def exit_code(self):  # what a kill by the signal gives, so a chain of commands stops too
        return 128 + self.signum

def fmt_duration(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

class Progress:
    """Images/s and ETA from the wall time between log points (each log point waits for the device)."""

    def __init__(self, total_iters, start_iter, images_per_iter):
        self.total, self.images_per_iter = total_iters, images_per_iter
        self.t0 = self.last_t = time.time()
        self.first = self.last_it = start_iter

    def due(self, seconds):
        """Whether `seconds` have passed since the last tick: progress for loops without log points."""
        return time.time() - self.last_t >= seconds

    def tick(self, it):
        """(images/s since the last tick, ETA in seconds) at iteration it."""
        now = time.time()
        rate = (it - self.last_it) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_it = now, it
        overall = (it - self.first) / max(now - self.t0, 1e-9)  # steadier for the ETA
        return rate * self.images_per_iter, (self.total - it) / max(overall, 1e-9)
