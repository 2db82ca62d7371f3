"""
bench.py on the CPU: the correctness guard (compiled bf16 path against plain fp32 eager, on the same
batch and masks) and the harness's report. No speed is asserted here: the machines are shared and
noisy, so speed lives in bench.py's output. Run with `python test_bench.py` or pytest.
"""
import json
import math
import re
import sys

import pytest
import torch

import bench
import data
from test_pretrain import make_data, run


@pytest.mark.parametrize("stage, attention", [("pretrain", "auto"), ("finetune", "auto"),
                                              ("pretrain", "encoder=math,decoder=flash")])
def test_optimised_path_gives_the_plain_loss(stage, attention):
    # compile=True, bfloat16 is the CUDA default; on the CPU it compiles C++ kernels instead
    result = run(["bench.py", f"--stage={stage}", "--check=True", "--compile=True", "--dtype=bfloat16",
                  f"--attention={attention}", "--device=cpu", "--batch_size=8", "--warmup=1",
                  "--steps_per_repeat=1", "--repeats=1"])
    rels = [float(r) for r in re.findall(r"relative difference ([0-9.e+-]+)", result.stdout)]
    print(f"{stage}: compiled bf16 vs eager fp32 loss over 4 steps, relative differences {rels}")
    assert len(rels) == 4 and max(rels) < bench.LOSS_TOLERANCE[stage]
    # the same crops, masks and targets: the optimised path changes no random draw
    differing = [float(f) for f in re.findall(r"augmentation, .*: ([0-9.e+-]+) of the values differ", result.stdout)]
    assert len(differing) == 8 and max(differing) == 0.0


def test_guard_lets_one_level_through_and_stops_two():
    # every pair of 8-bit levels k and k + step in each channel, normalised as the model sees them: the
    # guard's limit on the images must pass a one-level flip (compiled code rounding a pixel the other
    # way) and stop a two-level one, whatever float32 makes of the difference
    levels = torch.arange(254, dtype=torch.uint8).view(1, 1, 254, 1).expand(1, 1, 254, 3)
    gap = lambda step: (data.normalize(data.to_float(levels + step)) - data.normalize(data.to_float(levels))).abs()
    one, two = gap(1), gap(2)
    print(f"one-level flips: largest {one.max().item():.7f}, two-level: smallest {two.min().item():.7f}, "
          f"limit {bench.ONE_LEVEL:.7f}")
    assert one.max() <= bench.ONE_LEVEL < two.min()


def test_bench_reports_throughput_and_flops():
    result = run(["bench.py", "--stage=pretrain", "--device=cpu", "--dtype=float32", "--compile=False",
                  "--batch_size=4", "--warmup=1", "--steps_per_repeat=1", "--repeats=3", "--profile=True"])
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"images/s: [0-9,]+", lines[-1])
    rates = [int(r.replace(",", "")) for r in re.search(r"measurements \(images/s\): (.*)", result.stdout).group(1).split(", ")]
    images_per_s = int(lines[-1].split()[-1].replace(",", ""))
    assert len(rates) == 3 and images_per_s == sorted(rates)[1]  # the median
    ms = float(re.search(r"([0-9.]+) ms/step", result.stdout).group(1))
    assert abs(1000 * 4 / ms - images_per_s) <= 0.51  # batch 4; images/s is printed rounded to a whole number
    assert float(re.search(r"([0-9.]+) GFLOP/image", result.stdout).group(1)) == round(flops_by_hand("pretrain") / 1e9, 2)
    assert "aten::" in result.stdout and "Self CPU time total" in result.stdout  # the profile table
    # the augmentation timed on its own is a part of the step
    share = re.search(r"augmentation alone: ([0-9.]+) ms/batch = ([0-9]+)% of the step", result.stdout)
    assert float(share.group(1)) > 0 and 0 <= int(share.group(2)) <= 100


def flops_by_hand(stage):
    """One image's FLOPs in a training step, counted by hand: the model's matrix products
    (multiply-adds x 2), x 3 for forward + backward, except the patch embedding (x 2: its input, the
    pixels, needs no gradient), and the augmentation's. Pre-training: encoder 7 blocks on 65 tokens of 256
    (8 D^2 per token in the linears, 2 N^2 D in attention), the patch embedding of 64 patches, the
    decoder's embedding of 65 tokens, 2 blocks on 257 tokens of 128, its prediction of 48 values per
    token. Fine-tuning: the encoder on all 257 tokens, the head's 256 x 200. Both: the crop's resampling,
    two 64x64 matrices applied to each channel (data.resized_crop); fine-tuning's RandAugment also
    smooths every image for Sharpness (a 3x3 filter on the 62x62 interior) in each of its two op slots."""
    blocks = lambda n_blocks, N, D: n_blocks * (N * 8 * D * D + 2 * N * N * D)
    crop = 2 * 2 * 3 * 64 * 64 * 64
    if stage == "pretrain":
        macs = blocks(7, 65, 256) + 65 * 256 * 128 + blocks(2, 257, 128) + 257 * 128 * 48
        return 2 * (3 * macs + 2 * 64 * 48 * 256) + crop
    macs = blocks(7, 257, 256) + 256 * 200
    return 2 * (3 * macs + 2 * 256 * 48 * 256) + crop + 2 * (2 * 3 * 62 * 62 * 9)


@pytest.fixture
def small_bench(monkeypatch):
    """bench.py's globals for a quick in-process run: the reference model, bf16 eager on the CPU, batch 4."""
    for name, value in dict(stage="pretrain", device="cpu", dtype="bfloat16", compile=False, cuda_graph=False,
                            attention="auto", batch_size=4, NUM_IMAGES=64).items():
        monkeypatch.setattr(bench, name, value)
    return bench.synthetic_data("cpu")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_flop_count_matches_a_count_by_hand(small_bench, monkeypatch, stage):
    monkeypatch.setattr(bench, "stage", stage)
    flops = bench.flops_per_image(small_bench)
    print(f"{stage}: {flops:,.0f} FLOP/image by torch.utils.flop_counter, {flops_by_hand(stage):,} by hand")
    assert flops == flops_by_hand(stage)


def test_guard_stops_a_loss_beyond_its_tolerance(small_bench, monkeypatch):
    bench.check_paths(small_bench, "CPU")  # bf16 rounding passes
    monkeypatch.setitem(bench.LOSS_TOLERANCE, "pretrain", 1e-7)
    with pytest.raises(SystemExit, match="the optimised path's loss is"):
        bench.check_paths(small_bench, "CPU")


def test_guard_stops_images_two_levels_off(small_bench, monkeypatch):
    build = bench.build

    def one_value_off(synthetic, dtype, *args, **kwargs):  # the optimised path, one value two levels off
        run = build(synthetic, dtype, *args, **kwargs)
        if dtype != "float32":
            augment = run.augment

            def shifted(i):
                images, *rest = augment(i)
                images = images.clone()
                images.view(-1)[0] += 2 * bench.ONE_LEVEL
                return (images, *rest)
            run.augment = shifted
        return run
    monkeypatch.setattr(bench, "build", one_value_off)
    with pytest.raises(SystemExit, match="augmentation's images differ"):
        bench.check_paths(small_bench, "CPU")


def test_bench_times_the_step_that_trains(tmp_path):
    # bench.py's run(i), handed pretrain.py's data, batch order and lr schedule, gives the losses pretrain.py
    # trains with: the same model, optimizer, augmentation and step (the reference model, 4 iterations)
    data_dir = make_data(tmp_path / "data", n_train=32)
    result = run(["pretrain.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/run", "--batch_size=8", "--epochs=1",
                  "--warmup_epochs=0", "--blr=0.1", "--log_interval=1", "--knn_every=0", "--device=cpu",
                  "--dtype=float32", "--compile=False"])
    printed = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", result.stdout)]
    logged = json.loads(open(f"{tmp_path}/run/log.jsonl").readline())["loss"]
    images, labels = data.load_split(data_dir, "train", "cpu")
    lr = lambda it: 0.1 * 8 / 256 * 0.5 * (1 + math.cos(math.pi * it / 4))  # warm-up 0, then the cosine
    run_step = bench.build((images, labels, data.permutation(32, 0, 0, "cpu")), "float32", False, False, "auto", 8,
                           lr=lr)
    losses = [run_step(i).item() for i in range(4)]
    print(f"pretrain.py's losses {printed}, mean {logged:.6f}; bench.py's {losses}")
    assert losses == pytest.approx(printed, abs=5.1e-5) and abs(losses[0] - losses[3]) > 1e-3  # printed to 4 places
    assert sum(losses) / 4 == pytest.approx(logged, rel=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
