"""
The small pieces every stage script shares: devices and torchrun, mixed precision, the warm-up +
cosine schedule, AdamW parameter groups, checkpoints written atomically and read with clear errors,
progress lines with an ETA, and a clean stop on Ctrl-C or SIGTERM.
"""
import atexit
import json
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Attention, Encoder, ViTConfig

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


def wrap_model(model, compile, device, world_size):
    """The module the training step calls: compiled, and inside DDP under torchrun."""
    if compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    return model


ATTENTION_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def pin_attention(model, spec, device, dtype):
    """Which kernel scaled_dot_product_attention runs: spec 'auto' (PyTorch picks), one name of
    ATTENTION_KERNELS for every layer, or one per part, 'encoder=efficient,decoder=cudnn'. The
    fastest kernel depends on the sequence length and head width (bench.py --stage=attention), and
    the encoder's and the decoder's differ in pre-training."""
    if spec == "auto":
        return
    kernels = {}
    for part in spec.split(","):
        where, _, name = part.rpartition("=")
        if where not in ("", "encoder", "decoder") or name not in ATTENTION_KERNELS:
            raise SystemExit(f"error: attention={spec!r}: give 'auto', one of {', '.join(ATTENTION_KERNELS)}, "
                             f"or 'encoder=NAME,decoder=NAME'")
        q = torch.zeros(1, 1, 8, 64, device=device, dtype=getattr(torch, dtype))  # fail here, not in step 1
        try:
            with sdpa_kernel(ATTENTION_KERNELS[name]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PyTorch's reasons, one warning each: the error says enough
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError:
            raise SystemExit(f"error: attention={spec!r}: the {name} kernel does not run on {device} "
                             f"in {dtype}") from None
        kernels[where] = ATTENTION_KERNELS[name]
    for module_name, module in model.named_modules():
        if isinstance(module, Attention):
            part = "decoder" if module_name.startswith("decoder") else "encoder"
            module.kernel = kernels.get(part, kernels.get(""))


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
# CUDA graphs: a training step is hundreds of small kernels (the eager augmentation alone is about 150 of them
# in pre-training, 800 in fine-tuning), and launching them one by one from Python costs far more than
# running them. Recorded once as CUDA graphs (the augmentation, and the update), each step is two launches.


def cuda_graphed(fn, warmup=2):
    """fn(*tensors) -> tensors, run eagerly for its first `warmup` calls (they compile what is compiled
    and allocate what is allocated lazily), then recorded as a CUDA graph and replayed from then on.
    A replay reads the arguments through copies in fixed memory and returns the same output tensors
    every time, overwritten by the next replay: use them before calling again. Random ops in a replay
    draw exactly what the eager call would: PyTorch's graph-safe RNG reads the generator's seed and
    offset when the graph is launched, so re-seeding before a call works as in eager mode."""
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
            static_args = [a.clone() for a in args]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(*static_args)
        for static, a in zip(static_args, args):
            static.copy_(a)
        graph.replay()
        return static_out
    return call


def use_cuda_graphs(cuda_graph, device, world_size):
    """Whether the steps run as CUDA graphs: asked for, on a GPU, and in one process (under torchrun,
    DDP's all-reduce runs between the kernels, so the steps launch as usual)."""
    if cuda_graph and not device.startswith("cuda"):
        raise SystemExit(f"error: cuda_graph=True needs a CUDA device, not device={device!r}")
    return cuda_graph and world_size == 1


def make_capturable(optimizer, device):
    """AdamW inside a CUDA graph: the lr a tensor in device memory (set_lr fills it; a float would be
    frozen into the graph), and the step counters on the device."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


# -----------------------------------------------------------------------------
# optimisation


def cosine_lr(it, peak_lr, warmup_iters, total_iters):
    """Linear warm-up from 0, then half a cosine down to 0, per iteration (as the official MAE)."""
    if it < warmup_iters:
        return peak_lr * it / warmup_iters
    progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def layer_decay_groups(model, weight_decay, layer_decay):
    """The official MAE fine-tuning's parameter groups (param_groups_lrd): with n blocks, the patch
    embedding and cls token are layer 0, block i is layer i + 1, the rest (norms, head) layer n + 1;
    layer k learns at layer_decay ** (n + 1 - k) times the lr. No weight decay on 1-D parameters
    and the cls token."""
    num_layers = len(model.encoder.blocks) + 1
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.patch_embed", "encoder.cls_token")):
            layer = 0
        else:  # the final norm, fc_norm and head
            layer = num_layers
        no_decay = p.ndim == 1 or name == "encoder.cls_token"
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": layer_decay ** (num_layers - layer)})
        group["params"].append(p)
    return list(groups.values())


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)  # lr_scale: layer-wise decay in fine-tuning
        if torch.is_tensor(group["lr"]):  # a CUDA graph's optimizer reads it from device memory
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def param_groups(model, weight_decay):
    """No weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
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


def truncate_log(log_path, epochs_done):
    """Forget the log lines of epochs a resumed run will train again, and a line that a kill -9 cut short
    while it was being written."""
    def epoch_of(line):
        try:
            return json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    if os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if epoch_of(line) <= epochs_done]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)


def load_optimizer(optimizer, state):
    """optimizer.load_state_dict, keeping this run's own way of stepping (fused, capturable) and a
    plain float lr: a checkpoint of a CUDA-graph run resumes anywhere."""
    own = [{key: group[key] for key in ("fused", "capturable", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings, lr=float(group["lr"]))


def model_config(ckpt, path):
    try:
        return ViTConfig(**ckpt["model_args"])
    except TypeError as e:
        raise SystemExit(f"error: {path} has model settings this model.py does not know ({e})")


def load_weights(module, state, path, what):
    """load_state_dict, with a mismatch reported as one line naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise SystemExit(f"error: {path} does not hold {what} of the architecture its model_args describe "
                         f"({lines[1].strip() if len(lines) > 1 else lines[0]})")


def load_pretrained(path):
    """A pre-training checkpoint and its model config; a fine-tuning checkpoint, or any other file, is
    one clear line."""
    ckpt = load_checkpoint(path)
    cfg = model_config(ckpt, path)
    if any(k.startswith("head.") for k in ckpt["model"]):
        raise SystemExit(f"error: {path} is a fine-tuning checkpoint; give a pre-training one (ckpt_EPOCH.pt "
                         f"of pretrain.py)")
    return ckpt, cfg


def load_encoder(path, img_size):
    """The pre-trained encoder of an MAE checkpoint, with (config, checkpoint); a file that is not
    one, or does not fit the data, is one clear line."""
    ckpt, cfg = load_pretrained(path)
    if cfg.img_size != img_size:
        raise SystemExit(f"error: {path} was trained on {cfg.img_size}px images, the data are {img_size}px")
    encoder = Encoder(cfg)
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    load_weights(encoder, state, path, "an encoder")
    return encoder, cfg, ckpt


def make_out_dir(path):
    """Make out_dir (and its missing parents) early, so that a path that cannot be made fails before any
    work; the folders made here are removed at exit if the run wrote nothing into them (a start that
    failed on a bad input leaves no empty folder behind)."""
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


def hardware(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), PyTorch {torch.__version__}"


# -----------------------------------------------------------------------------
# progress


def finite_losses(window, count, first_iter, model, last_path, last_saved):
    """The losses of the `count` iterations since a log point (the host's one wait for the device),
    averaged over the processes under torchrun: each holds its own slice's loss, and the slices are
    equal, so their mean is the whole batch's. A loss that is not finite, or weights that are not (the
    last update's result, which no loss has checked yet), stop the run before anything is saved,
    saying what ckpt_last.pt holds (last_saved: the iteration it was saved at, or None)."""
    if dist.is_initialized():
        dist.all_reduce(window)
        window /= dist.get_world_size()
    losses = window[:count].tolist()
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise SystemExit(f"error: loss is {loss} at iteration {first_iter + i}; "
                             f"{kept_state(first_iter + i, last_path, last_saved)}")
    if not torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
        raise SystemExit(f"error: the weights are not finite after iteration {first_iter + count}; "
                         f"{kept_state(first_iter + count, last_path, last_saved)}")
    return losses


def kept_state(bad_iter, last_path, last_saved):
    """What ckpt_last.pt holds when the state at iteration bad_iter (after bad_iter updates) went bad."""
    name = os.path.basename(last_path)
    if last_saved is None:
        return f"this run has not saved {name} yet"
    if last_saved < bad_iter:  # its own loss was checked: finite
        return f"{last_path} keeps the last good state (iteration {last_saved})"
    return f"{last_path} holds the state that gave it (iteration {last_saved}): start again with other settings"


class StopSignal:
    """SIGTERM (`timeout`, a cluster's scheduler) or Ctrl-C asks a training loop to stop at its next log
    point, once ckpt_last.pt holds everything up to there, so that a resumed run loses nothing. Under
    torchrun the processes agree through one all-reduce per log point and stop at the same iteration."""

    def __init__(self, device):
        self.device = device
        self.asked = 0  # the signal this process got, set by the handler at any moment
        self.signum = 0  # the one all processes agreed on at the last log point
        self.work = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.ask)

    def ask(self, signum, frame):  # no printing here: the signal may land inside a print
        self.asked = self.asked or signum

    def received(self):
        """At a log point: whether to save and stop (the same answer in every process)."""
        signum = self.asked  # read once: a signal landing during the all-reduce counts at the next log point
        if dist.is_initialized():
            flag = torch.tensor([signum], device=self.device)
            # kept until the next call: if Gloo's worker thread dropped the last reference, at the end of
            # a run that could happen while Python shuts down, which aborts (pytorch/pytorch#179291)
            self.work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
            self.work.wait()
            signum = int(flag.item())
        self.signum = signum
        return signum != 0

    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""

    def exit_code(self):
        """What a kill by the signal would give (128 + its number), so a chain of commands stops too."""
        return 128 + self.signum if self.signum else 0


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

    def due(self, seconds):
        """Whether `seconds` have passed since the last tick: progress lines for loops without log points."""
        return time.time() - self.last_t >= seconds

    def tick(self, it):
        """(images/s since the last call, ETA in seconds) at iteration it."""
        now = time.time()
        rate = (it - self.last_it) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_it = now, it
        overall = (it - self.first) / max(now - self.t0, 1e-9)  # steadier for the ETA
        eta = (self.total - it) / max(overall, 1e-9)
        return rate * self.images_per_iter, eta
