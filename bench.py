"""
Throughput of the training steps that pretrain.py and finetune.py run (steps.py), augmentation and
optimizer included, on synthetic uint8 data of Tiny ImageNet's shape held on the device:

    python bench.py --stage=pretrain              # batch 256, the protocol's
    python bench.py --stage=finetune              # batch 128, the protocol's
    python bench.py --stage=pretrain --check      # optimised path vs plain fp32 eager: same augmentation and loss?
    python bench.py --stage=pretrain --profile    # the top kernels (or CPU ops) by time, and by family
    python bench.py --stage=attention             # each attention kernel at the model's shapes

Prints milliseconds per step, model FLOPs per image (counted by torch.utils.flop_counter), the
achieved fraction of the GPU's bf16 peak, the time of the augmentation alone, and images/s (the
median of `repeats` measurements of `steps` steps each, after warm-up) as its last line.
"""
import re
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import runtime
import steps
from configurator import configure
from model import MAE, Classifier, ViTConfig

# -----------------------------------------------------------------------------
stage = "pretrain"  # 'pretrain', 'finetune' or 'attention'
batch_size = 0  # left at 0: the protocol's batch of the stage, 256 for pre-training and 128 for fine-tuning
steps_per_repeat = 20
repeats = 5
warmup = 10  # steps before timing (compilation happens here)
check = False
profile = False
peak_tflops = 0.0  # the device's dense bf16 peak; 0: look it up by the GPU's name
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()
cuda_graph = torch.cuda.is_available()  # replay each step as CUDA graphs, as pretrain.py does
attention = "auto"  # attention kernel, as in pretrain.py: e.g. 'encoder=efficient,decoder=cudnn'
seed = 0
# -----------------------------------------------------------------------------
# bf16 tensor-core TFLOP/s that the share of the peak divides by: for Hopper the 790 of
# ../shared/reference.md, about 80% of the 989 dense on NVIDIA's H100 SXM and H200 datasheets (an H100
# PCIe's is 756); for the A100 its datasheet's 312. --peak_tflops sets another.
PEAKS = {"H100": 790.0, "H200": 790.0, "A100": 312.0}
NUM_IMAGES, NUM_CLASSES = 100_000, 200
# the profile's summary: GPU kernels (or CPU ops) by family, the first pattern that their name matches
# (Inductor names its pointwise and reduction kernels after the ops they fuse, attention's among them)
FAMILIES = {"compiled (Inductor)": r"^triton_(poi|per|red)_|^cpp_fused",
            "attention": r"sdpa|attention|fmha|flash|cudnn",
            "matrix products": r"gemm|nvjet|cutlass|xmma|splitk|cublas|^triton_tem_|aten::(add|b)?mm\b",
            "optimizer": r"multi_tensor|foreach|adam",
            "other": r""}


def synthetic_data(device):
    """Random uint8 images and labels of Tiny ImageNet's shape, in a random order, on the device."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (NUM_IMAGES, 64, 64, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=g).to(device)
    return images, labels, torch.randperm(NUM_IMAGES, generator=g).to(device)


def build(synthetic, dtype, compile, cuda_graph, attention, batch_size, checking=False):
    """The model, optimizer and step function as the stage script builds them; returns run(i),
    which sets the lr and runs training step i on the next batch, as the loops do, and
    run.augment(i), step i's augmented batch alone. checking: a model the guard can compare."""
    images, labels, order = synthetic
    device = str(images.device)
    torch.manual_seed(seed)
    cfg = ViTConfig()
    if stage == "pretrain":
        model = MAE(cfg).to(device)
        groups, betas = runtime.param_groups(model, 0.15), (0.9, 0.95)
    else:
        # the guard's model has no drop path, whose masks the compiled model draws with inductor's own
        # RNG rather than eager's, and a head of ordinary weights: a fresh head's tiny ones make every
        # loss log(200), whatever the features
        model = Classifier(cfg, NUM_CLASSES, pool="avg", drop_path=0.0 if checking else 0.1).to(device)
        if checking:
            torch.nn.init.normal_(model.head.weight, std=1.0)
        groups, betas = runtime.layer_decay_groups(model, 0.05, 0.75), (0.9, 0.999)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=betas, fused=device.startswith("cuda"))
    runtime.pin_attention(model, attention, device, dtype)
    model = runtime.wrap_model(model, compile, device, 1)
    common = dict(batch_size=batch_size, rank=0, world_size=1, seed=seed, device=device, dtype=dtype,
                  compile=compile, cuda_graph=cuda_graph)
    if stage == "pretrain":
        step = steps.make_pretrain_step(model, optimizer, num_patches=cfg.num_patches, crop_scale=(0.2, 1.0),
                                        mask_ratio=0.75, **common)
    else:  # config/ft_tin.py's augmentation, the heaviest we have
        step = steps.make_finetune_step(model, optimizer, num_classes=NUM_CLASSES, crop_scale=(0.08, 1.0),
                                        rand_augment_ops=2, rand_augment_magnitude=9,
                                        rand_augment_interpolation="bicubic", reprob=0.25, mixup=0.8, cutmix=1.0,
                                        mixup_mode="batch", label_smoothing=0.1, clip_grad=0.0, **common)

    def batch(i):
        idx = order[(i * batch_size) % (NUM_IMAGES - batch_size):][:batch_size]
        return (images[idx],) if stage == "pretrain" else (images[idx], labels[idx])

    def run(i):
        runtime.set_lr(optimizer, 1e-4)
        return step(*batch(i), i)

    def augment(i):
        runtime.seed_step(seed, i)
        return step.augment(*batch(i))
    run.augment = augment
    return run


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(synthetic):
    """Forward + backward FLOPs of one image: every matrix product and convolution of the step, the
    model's and its attention and the augmentation's (the crop's resampling, 3.1 MFLOP of pre-training's
    2,158, and fine-tuning's Sharpness filter), but no element-wise work."""
    images = 8
    run = build(synthetic, "float32", False, False, "auto", images)
    # the math attention backend is plain matrix products, which the counter knows on every device
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(0)
    return counter.get_total_flops() / images


# what the guard lets through. The loss: bf16 rounding, measured at most 4.3e-4 (pre-training) and 1.9e-3
# (fine-tuning, whose guard model has large logits) on CPUs and GPUs, with a margin; a wrong path moves
# it more (pre-training with a mask ratio of 0.5 instead of 0.75: 3e-3). The augmentation: at most a
# per-mille of the values off, each by at most one 8-bit level (compiled code may fuse a multiply-add
# of the bicubic resampling and round a rare pixel the other way: on the H200, up to 3e-5 of them);
# the mask noise and soft targets exact up to float rounding.
LOSS_TOLERANCE = {"pretrain": 2e-3, "finetune": 5e-3}
# one 8-bit level of a normalised image, with a margin for the float32 rounding of the two normalised
# values whose difference it is (up to 4e-6 of a level: without it the H200 failed a one-level flip)
ONE_LEVEL = 1.001 / (255 * min(data.STD))


def check_paths(synthetic, card):
    """The correctness guard, on the same batches: the optimised path's augmentation equals the plain
    one's, and its loss is the plain fp32 eager loss up to bf16 rounding. Four steps, so that with
    cuda_graph the last two are graph replays (the first two run eagerly, see runtime.cuda_graphed)."""
    plain = build(synthetic, "float32", False, False, "auto", batch_size, checking=True)
    fast = build(synthetic, dtype, compile, cuda_graph, attention, batch_size, checking=True)
    names = ("images", "mask noise") if stage == "pretrain" else ("images", "soft targets")
    for i in range(4):
        for name, a, b in zip(names, plain.augment(i), fast.augment(i)):
            differ, worst = ((a - b).abs() > 1e-4).float().mean().item(), (a - b).abs().max().item()
            print(f"check {stage} step {i} augmentation, {name}: {differ:.2e} of the values differ, "
                  f"largest difference {worst:.2e}")
            if differ > 1e-3 or worst > (ONE_LEVEL if name == "images" else 1e-4):
                raise SystemExit(f"error: the optimised augmentation's {name} differ from the plain path's")
    for i in range(4):
        plain_loss, fast_loss = plain(i).item(), fast(i).item()
        rel = abs(fast_loss - plain_loss) / abs(plain_loss)
        print(f"check {stage} step {i}: plain fp32 eager loss {plain_loss:.5f}, {dtype} compile={compile} "
              f"cuda_graph={cuda_graph} attention={attention} loss {fast_loss:.5f}, "
              f"relative difference {rel:.2e} ({card})")
        if rel > LOSS_TOLERANCE[stage]:
            raise SystemExit(f"error: the optimised path's loss is {rel:.1%} away from the plain path's")


def attention_times():
    """Forward + backward of scaled_dot_product_attention at the model's shapes, each kernel PyTorch
    has ('auto' is its own choice), median ms of `repeats` timings of `steps_per_repeat` calls."""
    shapes = {"pre-training encoder": (256, 4, 65, 64), "pre-training decoder": (256, 4, 257, 32),
              "fine-tuning encoder": (128, 4, 257, 64)}  # (B, heads, tokens, head width)
    backends = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    width = max(map(len, shapes)) + 22
    print(f"{'attention fwd+bwd, ms':<{width}}" + "".join(f"{b:>10}" for b in backends))
    float_type = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    for name, shape in shapes.items():
        q, k, v = (torch.randn(shape, device=device, dtype=float_type, requires_grad=True) for _ in range(3))
        row = f"{name} {tuple(shape[2:])!s:<{width - len(name) - 1}}"
        for backend in backends.values():
            def call():
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            try:
                with sdpa_kernel(backend) if backend else nullcontext():
                    for _ in range(3):
                        call()
                    times = []
                    for _ in range(repeats):
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(steps_per_repeat):
                            call()
                        sync()
                        times.append(1000 * (time.perf_counter() - t0) / steps_per_repeat)
                row += f"{statistics.median(times):10.3f}"
            except RuntimeError:  # this kernel does not take these shapes, dtype or device
                row += f"{'n/a':>10}"
        print(row)


def print_families(averages, num_steps):
    """Time and count per step of each family of GPU kernels (on the CPU: of ATen ops, by self time):
    many short kernels point at fusion, a few long ones at the kernels themselves."""
    on_gpu = device.startswith("cuda")
    rows = [(e.key, e.self_device_time_total if on_gpu else e.self_cpu_time_total, e.count)
            for e in averages if e.device_type == (DeviceType.CUDA if on_gpu else DeviceType.CPU)]
    totals = {name: [0.0, 0] for name in FAMILIES}
    for key, us, count in rows:
        family = next(name for name, pattern in FAMILIES.items() if re.search(pattern, key, re.IGNORECASE))
        totals[family][0] += us / 1000 / num_steps
        totals[family][1] += count / num_steps
    all_ms, all_count = sum(ms for ms, _ in totals.values()), sum(n for _, n in totals.values())
    what = "GPU kernels" if on_gpu else "CPU ops (self time)"
    print(f"{what} per step, by family:")
    for name, (ms, count) in totals.items():
        print(f"  {name:<22}{ms:8.3f} ms {ms / all_ms:5.0%}  {count:6.0f} calls")
    print(f"  {'all':<22}{all_ms:8.3f} ms {1:5.0%}  {all_count:6.0f} calls")


def seconds_per_call(fn, first):
    """`repeats` timings of fn(i) over `steps_per_repeat` consecutive i from `first`, in seconds per call."""
    times, i = [], first
    sync()  # nothing queued before may land in the first timing
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps_per_repeat):
            fn(i)
            i += 1
        sync()
        times.append((time.perf_counter() - t0) / steps_per_repeat)
    return times


def main():
    global batch_size, cuda_graph
    configure(globals(), sys.argv[1:])
    if stage not in ("pretrain", "finetune", "attention"):
        raise SystemExit(f"error: stage must be 'pretrain', 'finetune' or 'attention', not {stage!r}")
    batch_size = batch_size or {"pretrain": 256, "finetune": 128}.get(stage, 0)
    runtime.setup_device(device, dtype, seed)
    cuda_graph = runtime.use_cuda_graphs(cuda_graph, device, 1)
    card = runtime.hardware(device)
    if stage == "attention":
        print(card)
        return attention_times()
    synthetic = synthetic_data(device)
    if check:  # four batches through both paths, from the same weights: augmentation and loss compared
        check_paths(synthetic, card)
    run = build(synthetic, dtype, compile, cuda_graph, attention, batch_size)
    for i in range(warmup):
        run(i)
    sync()
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(steps_per_repeat):
                run(warmup + i)
            sync()
        key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20))
        print_families(prof.key_averages(), steps_per_repeat)
    rates = [batch_size / s for s in seconds_per_call(run, warmup)]
    images_per_s = statistics.median(rates)
    flops = flops_per_image(synthetic)
    line = (f"{stage}: batch {batch_size}, {dtype}, compile={compile}, cuda_graph={cuda_graph}, "
            f"attention={attention}, {card}: "
            f"{1000 * batch_size / images_per_s:.2f} ms/step, {flops / 1e9:.2f} GFLOP/image")
    peak = peak_tflops or next((v for k, v in PEAKS.items() if k in card), 0.0)
    if peak:
        line += f", {flops * images_per_s / 1e12:.0f} TFLOP/s = {flops * images_per_s / (peak * 1e12):.1%} of {peak:g}"
    print(line)
    augment_s = statistics.median(seconds_per_call(run.augment, warmup + repeats * steps_per_repeat))
    print(f"augmentation alone: {1000 * augment_s:.2f} ms/batch = "
          f"{augment_s * images_per_s / batch_size:.0%} of the step")
    print(f"measurements (images/s): {', '.join(f'{r:,.0f}' for r in rates)}")
    print(f"images/s: {images_per_s:,.0f}")


if __name__ == "__main__":
    main()
