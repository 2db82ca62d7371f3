"""
bench.py on the CPU: the correctness guard (compiled bf16 path against plain fp32 eager, on the same
batch and masks) and the harness's report. No speed is asserted here: the machines are shared and
noisy, so speed lives in bench.py's output. Run with `python test_bench.py` or pytest.
"""
import re
import sys

import pytest
import torch

import bench
import data
from test_pretrain import run


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
    assert "aten::" in result.stdout  # the profile table
    # and its summary by family: every op of the step (one step profiled) in exactly one family
    families = dict(re.findall(r"^  (\S.*?) +([0-9.]+) ms", result.stdout, re.MULTILINE))
    assert set(families) == set(bench.FAMILIES) | {"all"}
    total = float(families.pop("all"))
    assert float(families["matrix products"]) > 0 and float(families["attention"]) > 0
    assert abs(sum(map(float, families.values())) - total) < 0.01 * total
    value, unit = re.search(r"Self CPU time total: ([0-9.]+)(us|ms|s)\b", result.stdout).groups()
    assert total == pytest.approx(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], rel=1e-3)
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


def family(kernel):
    return next(name for name, pattern in bench.FAMILIES.items() if re.search(pattern, kernel, re.IGNORECASE))


def test_profile_families_of_gpu_kernels():
    # kernel names as the H200 profile printed them (results/h200/bench.txt), and PyTorch's own
    # attention kernels, whose names mention the CUTLASS library their matrix tiles come from
    expected = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg": "attention",
                "void cudnn::fusion::convert_dq_to_16bits<true>(void": "attention",
                "fmha_cutlassB_f16_aligned_64x64_k64_sm80": "attention",
                "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention",
                "nvjet_sm90_tst_64x64_64x13_1x2_h_bz_splitK_NTT": "matrix products",
                "void cublasLt::splitKreduce_kernel<32, 16, int, floa": "matrix products",
                "triton_tem_fused_addmm_gelu_3": "matrix products",
                "triton_per_fused__to_copy_add_native_layer_norm_back": "compiled (Inductor)",
                "triton_poi_fused__scaled_dot_product_cudnn_attention_backward_7": "compiled (Inductor)",
                "void at::native::(anonymous namespace)::multi_tensor": "optimizer",
                "void at::native::reduce_kernel<128, 4, at::native::R": "other",
                "aten::addmm": "matrix products", "aten::mm": "matrix products", "aten::mul": "other"}
    assert {kernel: family(kernel) for kernel in expected} == expected


def test_attention_table_times_each_kernel():
    result = run(["bench.py", "--stage=attention", "--device=cpu", "--dtype=float32", "--repeats=1",
                  "--steps_per_repeat=1"])
    header, *rows = result.stdout.strip().splitlines()[1:]
    assert header.split()[-5:] == ["auto", "flash", "efficient", "cudnn", "math"]
    assert len(rows) == 3
    for row in rows:  # the plain math kernel runs everywhere
        assert float(row.split()[-1]) > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
