"""
Throughput of the training steps that pretrain.py and finetune.py run (steps.py), augmentation and
optimizer included, on synthetic uint8 data of Tiny ImageNet's shape held on the device:

    python bench.py --stage=pretrain --device=cuda --batch_size=256
    python bench.py --stage=finetune --device=cuda --batch_size=128
    python bench.py --stage=pretrain --check      # optimised path vs plain fp32 eager: same loss?
    python bench.py --stage=pretrain --profile    # the top kernels (or CPU ops) by time

Prints milliseconds per step, model FLOPs per image (counted by torch.utils.flop_counter), the
achieved fraction of the GPU's bf16 peak, and images/s (the median of `repeats` measurements of
`steps` steps each, after warm-up) as its last line.
"""
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import runtime
import steps
from configurator import configure
from model import MAE, Classifier, ViTConfig

# -----------------------------------------------------------------------------
stage = "pretrain"  # 'pretrain' or 'finetune'
batch_size = 256
steps_per_repeat = 20
repeats = 5
warmup = 10  # steps before timing (compilation happens here)
check = False
profile = False
peak_tflops = 0.0  # the device's dense bf16 peak; 0: look it up by the GPU's name
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()
seed = 0
# -----------------------------------------------------------------------------
# dense bf16 tensor-core peaks, TFLOP/s: the 790 of ../shared/reference.md for Hopper cards
PEAKS = {"H100": 790.0, "H200": 790.0, "A100": 312.0}
NUM_IMAGES, NUM_CLASSES = 100_000, 200


def synthetic_data(device):
    """Random uint8 images and labels of Tiny ImageNet's shape, in a random order, on the device."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (NUM_IMAGES, 64, 64, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=g).to(device)
    return images, labels, torch.randperm(NUM_IMAGES, generator=g).to(device)


def build(synthetic, dtype, compile, batch_size):
    """The model, optimizer and step function as the stage script builds them; returns run(i),
    which sets the lr and runs training step i on the next batch, as the loops do."""
    images, labels, order = synthetic
    device = str(images.device)
    torch.manual_seed(seed)
    cfg = ViTConfig()
    if stage == "pretrain":
        model = MAE(cfg).to(device)
        optimizer = torch.optim.AdamW(runtime.param_groups(model, 0.15), lr=1e-4, betas=(0.9, 0.95),
                                      fused=device.startswith("cuda"))
        step = steps.make_pretrain_step(torch.compile(model) if compile else model, optimizer,
                                        num_patches=cfg.num_patches, batch_size=batch_size, rank=0, world_size=1,
                                        seed=seed, crop_scale=(0.2, 1.0), mask_ratio=0.75, device=device, dtype=dtype)
    else:  # config/ft_tin.py's augmentation, the heaviest we have
        model = Classifier(cfg, NUM_CLASSES, pool="avg", drop_path=0.1).to(device)
        if check:  # a fresh head's tiny weights make every loss log(200): let the features decide it
            torch.nn.init.normal_(model.head.weight, std=1.0)
        optimizer = torch.optim.AdamW(runtime.layer_decay_groups(model, 0.05, 0.75), lr=1e-4, betas=(0.9, 0.999),
                                      fused=device.startswith("cuda"))
        step = steps.make_finetune_step(
            torch.compile(model) if compile else model, optimizer, num_classes=NUM_CLASSES, batch_size=batch_size,
            rank=0, world_size=1, seed=seed, crop_scale=(0.08, 1.0), rand_augment_ops=2, rand_augment_magnitude=9,
            reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1, clip_grad=0.0, device=device, dtype=dtype)

    def run(i):
        runtime.set_lr(optimizer, 1e-4)
        idx = order[(i * batch_size) % (NUM_IMAGES - batch_size):][:batch_size]
        return step(images[idx], i) if stage == "pretrain" else step(images[idx], labels[idx], i)
    return run


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(synthetic):
    """Forward + backward FLOPs of one image through the model (matrix products and attention;
    the augmentation and the optimizer are a rounding error)."""
    run = build(synthetic, "float32", False, 8)
    # the math attention backend is plain matrix products, which the counter knows on every device
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(0)
    return counter.get_total_flops() / 8


def main():
    configure(globals(), sys.argv[1:])
    if stage not in ("pretrain", "finetune"):
        raise SystemExit(f"error: stage must be 'pretrain' or 'finetune', not {stage!r}")
    runtime.setup_device(device, dtype, seed)
    card = runtime.hardware(device)
    synthetic = synthetic_data(device)
    if check:  # the same first batch, crops, masks and weights through both paths
        plain = build(synthetic, "float32", False, batch_size)(0).item()
        fast = build(synthetic, dtype, compile, batch_size)(0).item()
        rel = abs(fast - plain) / abs(plain)
        print(f"check {stage}: plain fp32 eager loss {plain:.5f}, {dtype} compile={compile} loss {fast:.5f}, "
              f"relative difference {rel:.2e} ({card})")
        if rel > 2e-2:  # bf16 keeps 8 bits of mantissa: a per-mille error, never percents
            raise SystemExit(f"error: the optimised path's loss is {rel:.1%} away from the plain path's")
    run = build(synthetic, dtype, compile, batch_size)
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
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20))
    rates, it = [], warmup
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps_per_repeat):
            run(it)
            it += 1
        sync()
        rates.append(steps_per_repeat * batch_size / (time.perf_counter() - t0))
    images_per_s = statistics.median(rates)
    flops = flops_per_image(synthetic)
    line = (f"{stage}: batch {batch_size}, {dtype}, compile={compile}, {card}: "
            f"{1000 * batch_size / images_per_s:.2f} ms/step, {flops / 1e9:.2f} GFLOP/image")
    peak = peak_tflops or next((v for k, v in PEAKS.items() if k in card), 0.0)
    if peak:
        line += f", {flops * images_per_s / 1e12:.0f} TFLOP/s = {flops * images_per_s / (peak * 1e12):.1%} of {peak:g}"
    print(line)
    print(f"measurements (images/s): {', '.join(f'{r:,.0f}' for r in rates)}")
    print(f"images/s: {images_per_s:,.0f}")


if __name__ == "__main__":
    main()
