"""
Throughput of the training steps, augmentation and AdamW included, on synthetic uint8 data of Tiny ImageNet's
shape held on the device. The step is the stage script's own make_step, imported: the code that trains.

    python bench.py --stage=pretrain                  # batch 256, pretrain.py's recipe
    python bench.py --stage=finetune                  # batch 128, config/ft_tin.py's heavy augmentation
    python bench.py --stage=pretrain --check=True     # the optimised path against plain fp32 eager
    python bench.py --stage=pretrain --profile=True   # the top kernels (or CPU ops) by time
    python bench.py --attention=encoder=efficient,decoder=cudnn   # another attention kernel

Prints milliseconds per step, model FLOPs per image (torch.utils.flop_counter), the share of the GPU's bf16
peak, the augmentation's time alone, and images/s (the median of `repeats` timings of `steps_per_repeat`
steps, after warm-up) as its last line.
"""
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import finetune
import pretrain
import runtime
from configurator import configure
from model import MAE, Classifier, ViTConfig, param_groups

# -----------------------------------------------------------------------------
stage = "pretrain"  # 'pretrain' or 'finetune'
batch_size = 0  # 0: the stage's own, 256 for pre-training and 128 for fine-tuning
steps_per_repeat = 20
repeats = 5
warmup = 10  # steps before timing (compilation happens here)
check = False  # first compare the optimised path with plain fp32 eager on the same batches
profile = False
peak_tflops = 0.0  # the device's dense bf16 peak; 0: look it up by the GPU's name
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = torch.cuda.is_available()
cuda_graph = torch.cuda.is_available()  # replay each step as CUDA graphs, as the stage scripts do
attention = "auto"  # the attention kernel, as in pretrain.py: e.g. 'encoder=efficient,decoder=cudnn'
seed = 0
# -----------------------------------------------------------------------------
# bf16 tensor-core TFLOP/s the share of the peak divides by: for Hopper 790, about 80% of the 989 dense of
# NVIDIA's H100 SXM and H200 datasheets (an H100 PCIe's is 756); for the A100 its datasheet's 312
PEAKS = {"H100": 790.0, "H200": 790.0, "A100": 312.0}
NUM_IMAGES, NUM_CLASSES = 100_000, 200
def synthetic_data(device):
    """Random uint8 images and labels of Tiny ImageNet's shape, in a random order, on the device."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (NUM_IMAGES, 64, 64, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=g).to(device)
    return images, labels, torch.randperm(NUM_IMAGES, generator=g).to(device)

def build(synthetic, dtype, compile, graphs, attention, batch, checking=False, lr=lambda i: 1e-4):
    """The model and optimizer as the stage script makes them, and its step; returns run(i), which sets the lr
    and runs training step i on the next batch as the loop does, and run.augment(i), step i's augmentation
    alone. checking: a model the guard can compare."""
    images, labels, order = synthetic
    device = str(images.device)
    script = pretrain if stage == "pretrain" else finetune
    script.batch_size = batch
    torch.manual_seed(seed)
    if stage == "pretrain":
        model = MAE(ViTConfig(), pretrain.norm_pix_loss).to(device)
        groups = param_groups(model, pretrain.weight_decay, decay_all=pretrain.decay_all)
    else:
        # the guard's model has no drop path, whose masks compiled code draws with inductor's own RNG, and a
        # head of ordinary weights: a fresh head's tiny ones make every loss log(200), whatever the features
        model = Classifier(ViTConfig(), NUM_CLASSES, finetune.pool, 0.0 if checking else finetune.drop_path,
                           finetune.head).to(device)
        if checking:
            torch.nn.init.normal_(model.head.weight, std=1.0)
        groups = param_groups(model, finetune.weight_decay, finetune.layer_decay, finetune.decay_all)
    optimizer = torch.optim.AdamW(groups, lr=lr(0), betas=(script.beta1, script.beta2),
                                  fused=device.startswith("cuda"))
    model = runtime.wrap(model, compile, device, 1, attention, dtype)
    extra = () if stage == "pretrain" else (NUM_CLASSES,)
    step = script.make_step(model, optimizer, *extra, device, dtype, compile, graphs)

    def batch_of(i):
        idx = order[(i * batch) % (len(order) - batch + 1):][:batch]
        return (images[idx],) if stage == "pretrain" else (images[idx], labels[idx])

    def run(i):
        runtime.set_lr(optimizer, lr(i))
        return step(*batch_of(i), i)

    def augment(i):
        runtime.seed_step(script.seed, i)
        return step.augment(*batch_of(i))
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
    if stage == "finetune":  # the heaviest augmentation we have
        here = os.path.dirname(os.path.abspath(__file__))
        configure(vars(finetune), [os.path.join(here, "config", "ft_tin.py")])
    batch_size = batch_size or (pretrain if stage == "pretrain" else finetune).batch_size
    runtime.setup(device, seed)
    cuda_graph = runtime.use_cuda_graphs(cuda_graph, device, 1)
    card = runtime.hardware(device)
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
    rates = [batch_size / s for s in seconds_per_call(run, warmup)]
    images_per_s = statistics.median(rates)
    flops = flops_per_image(synthetic)
    line = (f"{stage}: batch {batch_size}, {dtype}, compile={compile}, cuda_graph={cuda_graph}, "
            f"attention={attention}, {card}: "
            f"{1000 * batch_size / images_per_s:.2f} ms/step, {flops / 1e9:.2f} GFLOP/image")
    peak = peak_tflops or next((v for k, v in PEAKS.items() if k in card), 0.0)
    if peak:
        tflops = flops * images_per_s / 1e12
        line += f", {tflops:.0f} TFLOP/s = {tflops / peak:.1%} of {peak:g}"
    print(line)
    augment_s = statistics.median(seconds_per_call(run.augment, warmup + repeats * steps_per_repeat))
    print(f"augmentation alone: {1000 * augment_s:.2f} ms/batch = "
          f"{augment_s * images_per_s / batch_size:.0%} of the step")
    print(f"measurements (images/s): {', '.join(f'{r:,.0f}' for r in rates)}")
    print(f"images/s: {images_per_s:,.0f}")

if __name__ == "__main__":
    main()
