"""
The evaluation stages on the CPU: cached versus plain linear probe, k-NN against a plain loop,
layer-wise lr decay, checkpoints arriving in fine-tuning unchanged, bad --init values, and a tiny
end-to-end run (pre-train, probe, fine-tune, plot, reconstruct). Run with `python test_eval.py` or pytest.
"""
import json
import math
import os
import re
import shutil
import signal
import sys
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import configurator
import data
import plot
import probe
import reconstruct
import finetune
import runtime
from model import MAE, Classifier, ViTConfig, param_groups, pretrained_encoder
from test_pretrain import TINY, kill_at, load, make_data, run

SMALL = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pre-training run on generated data: (data_dir, out_dir)."""
    root = tmp_path_factory.mktemp("eval")
    data_dir = make_data(root / "data", n_train=48, n_val=16)
    out = str(root / "pre")
    run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--save_every=1", "--epochs=2"])
    return data_dir, out


def test_cached_and_crop_probes_equal_plain_probe(monkeypatch):
    torch.manual_seed(0)
    encoder = MAE(SMALL).encoder.eval()
    images = torch.randint(0, 256, (40, 64, 64, 3), dtype=torch.uint8)
    labels = torch.arange(40) % 5
    probe.device, probe.dtype, probe.batch_size, probe.epochs, probe.warmup_epochs = "cpu", "float32", 8, 2, 1
    probe.blr = 1e-1  # large enough that the heads move well away from their start

    cached = torch.stack([probe.encode(encoder, images, "cls", "float32", 512, flip) for flip in (False, True)], dim=1)

    @torch.no_grad()
    def plain(idx, flip):  # the encoder on this step's images, each mirrored or not
        x = data.to_float(images[idx])
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return encoder(data.normalize(x))[:, 0]

    modes_seen = []  # the head's training flag at each end-of-epoch call
    head_cached = probe.train_head(lambda idx, flip: cached[idx, flip.long()], labels, 32, 5,
                                   lambda head: modes_seen.append(head.training))
    head_plain = probe.train_head(plain, labels, 32, 5)
    # train_crop's path with crops that always take the whole image (scale 1, the only aspect that fits
    # is 1): each step's images go through the crop and resize, which must leave them as they are
    monkeypatch.setattr(probe, "crop_scale", (1.0, 1.0))
    head_crop = probe.train_head(probe.crop_features(encoder, images), labels, 32, 5)
    assert modes_seen == [False] * probe.epochs
    monkeypatch.setattr(probe, "epochs", 0)  # no step: the head as every run above started it
    start = probe.train_head(plain, labels, 32, 5)[1].weight
    moved = (head_plain[1].weight - start).abs().max().item()
    assert moved > 5e-3
    for name, head in (("cached", head_cached), ("whole-image crops", head_crop)):
        diff = (head[1].weight - head_plain[1].weight).abs().max().item()
        print(f"{name} vs plain probe head: largest difference {diff:.2e} (weights moved {moved:.2e})")
        assert diff < 1e-3 * moved
        assert torch.allclose(head[0].running_mean, head_plain[0].running_mean, atol=1e-4)


def test_crop_probe_trains_on_crops(monkeypatch):
    # the crops the head trains on are each image's Pillow crop + resize from crop_boxes, mirrored where the step
    # says: the features of a crop_scale step equal the encoder's on those crops, made independently with Pillow
    torch.manual_seed(0)
    encoder = MAE(SMALL).encoder.eval()
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    for key, value in dict(device="cpu", dtype="float32", features="cls", crop_scale=(0.08, 1.0)).items():
        monkeypatch.setattr(probe, key, value)
    flip = torch.tensor([True, False, True, False, False, True])
    torch.manual_seed(5)
    got = probe.crop_features(encoder, images)(torch.arange(6), flip)
    torch.manual_seed(5)
    top, left, h, w = (t.tolist() for t in data.crop_boxes(data.crop_flip_draws(6, (0.08, 1.0)), 64, 64))
    assert len({(a, b) for a, b in zip(h, w)}) > 1 and min(h) < 64  # real crops, of several sizes
    crops = []
    for i in range(6):
        crop = Image.fromarray(images[i].numpy()).crop((left[i], top[i], left[i] + w[i], top[i] + h[i]))
        crop = crop.resize((64, 64), Image.BICUBIC)
        crops.append(np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if flip[i] else crop))
    expected = encoder(data.normalize(data.to_float(torch.from_numpy(np.stack(crops)))))[:, 0]
    diff = (got - expected).abs().max().item()
    print(f"crop probe features against Pillow's crops: largest difference {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("features", ["cls", "avg", "both"])
def test_feature_extraction_keeps_no_batch_of_tokens(features, monkeypatch):
    # each batch's tokens, (B, 1 + L, D), are 257 times its features: kept alive (say, behind a view),
    # the 100,000 training images' would fill 26 GB
    class Recording(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder, self.made = encoder, []

        def forward(self, x):
            assert all(ref() is None for ref in self.made[:-1]), "an earlier batch's tokens are still alive"
            tokens = self.encoder(x)  # (B, 1 + L, D)
            self.made.append(weakref.ref(tokens))
            return tokens

    encoder = Recording(MAE(SMALL).encoder.eval())
    for key, value in dict(device="cpu", dtype="float32", eval_batch_size=4, features=features).items():
        monkeypatch.setattr(probe, key, value)
    f = probe.encode(encoder, torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8), features, "float32", 4)
    assert f.shape == (16, 64 if features == "both" else 32) and len(encoder.made) == 4
    assert all(ref() is None for ref in encoder.made)


def test_knn_matches_plain_loop():
    torch.manual_seed(0)
    train_f, val_f = torch.randn(60, 8), torch.randn(7, 8)
    train_y = torch.arange(60) % 4
    scores = probe.knn_scores(train_f, train_y, val_f, 4, 5, 0.1)
    for i in range(7):
        sims = [float(val_f[i] @ t / (val_f[i].norm() * t.norm())) for t in train_f]
        nearest = sorted(range(60), key=lambda j: -sims[j])[:5]
        expected = [sum(np.exp(sims[j] / 0.1) for j in nearest if train_y[j] == c) for c in range(4)]
        assert np.allclose(scores[i].numpy(), expected, rtol=1e-4)


def test_knn_against_a_brute_force_count():
    # crafted features with known neighbours: 2-D vectors at known angles (lengths 1, 2, 4: they do not count).
    # Validation point 0 (at 1 degree) has its 3 nearest in class 1, then one of class 0; point 1 (at 95) has
    # two class-2 vectors and the same two of class 0 nearest: a tie of votes, which the lower class wins.
    # Class 3 is no one's neighbour until k takes in every training vector.
    angle = lambda degrees: torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])
    train = [(0, 1), (5, 1), (-5, 1), (12, 0), (90, 2), (100, 2), (90, 0), (100, 0), (180, 3), (200, 3)]
    train_f = torch.stack([angle(a) * 2 ** (i % 3) for i, (a, _) in enumerate(train)])
    train_y = torch.tensor([c for _, c in train])
    val_f, val_y = torch.stack([angle(1), angle(95)]), torch.tensor([1, 0])

    def brute_force(k, temperature):  # every pair, in plain Python
        scores = []
        for v in val_f.tolist():
            sims = [sum(a * b for a, b in zip(v, t)) / math.hypot(*v) / math.hypot(*t) for t in train_f.tolist()]
            nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
            scores.append([sum(math.exp(sims[j] / temperature) for j in nearest if train[j][1] == c) for c in range(4)])
        return torch.tensor(scores)

    for k, temperature in ((4, 0.07), (6, 0.5), (10, 1.0)):
        got = probe.knn_scores(train_f, train_y, val_f, 4, k, temperature)
        print(f"k-NN votes, k={k}: largest difference from the brute-force count "
              f"{(got - brute_force(k, temperature)).abs().max().item():.2e}")
        assert torch.allclose(got, brute_force(k, temperature), rtol=1e-5)
    votes = probe.knn_scores(train_f, train_y, val_f, 4, 4, 0.5)
    assert votes[0, 3] == votes[1, 3] == votes[1, 1] == 0 and votes[1, 0] == votes[1, 2] > 0  # the tie
    assert votes[0].argmax() == 1 and votes[0, 0] > 0
    assert probe.top_k_accuracy(votes, val_y) == (100.0, 100.0)  # point 1: the tie goes to class 0


def test_top5_counts_a_label_anywhere_among_the_five_best_scores():
    # each row's label sits at a known rank of its scores: 1, 3, 7 (a miss) and 5
    scores = torch.tensor([[9., 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1], [0, 9, 8, 7, 6, 1, 2]])
    labels = torch.tensor([0, 4, 6, 6])
    ranks = [sorted(range(7), key=lambda c: -scores[r, c].item()).index(labels[r].item()) for r in range(4)]
    assert ranks == [0, 2, 6, 4]
    expected = (100 * sum(r == 0 for r in ranks) / 4, 100 * sum(r < 5 for r in ranks) / 4)  # (25.0, 75.0)
    assert probe.top_k_accuracy(scores, labels) == expected

    class Lookup(torch.nn.Module):  # image i (every pixel 10 * i) scores as row i
        def forward(self, x):
            value = (x[:, 0, 0, 0] * data.STD[0] + data.MEAN[0]) * 255
            return scores[(value / 10).round().long()]
    images = (torch.arange(4) * 10).view(4, 1, 1, 1).expand(4, 8, 8, 3).to(torch.uint8)
    got = probe.top_k_accuracy(probe.outputs(Lookup(), images, "float32", 3), labels)  # two batches
    assert got == pytest.approx(expected)


def test_probe_trains_on_each_images_plain_and_mirrored_features(pretrained, monkeypatch, tmp_path):
    # what probe.probe hands train_head: for each step's images, the encoder's features of the image as it
    # is, or mirrored (by Pillow) where the step's flip says
    data_dir, pre = pretrained
    for key, value in dict(device="cpu", dtype="float32", features="cls", out_dir=str(tmp_path)).items():
        monkeypatch.setattr(probe, key, value)
    handed = []

    def train_head(features_of, labels, dim, num_classes, after_epoch):
        handed.append(features_of)
        head = torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False), torch.nn.Linear(dim, num_classes)).eval()
        after_epoch(head)
        return head
    monkeypatch.setattr(probe, "train_head", train_head)
    (train_x, train_y), (val_x, val_y) = (data.load_split(data_dir, split, "cpu") for split in ("train", "val"))
    probe.probe(f"{pre}/ckpt_2.pt", train_x, train_y, val_x, val_y, 4)
    encoder = pretrained_encoder(load(f"{pre}/ckpt_2.pt"), "ckpt_2.pt", 64)[0].eval()
    idx, flip = torch.tensor([5, 0, 7, 3]), torch.tensor([True, False, False, True])
    pictures = [Image.fromarray(train_x[i].numpy()) for i in idx]
    pictures = [p.transpose(Image.FLIP_LEFT_RIGHT) if f else p for p, f in zip(pictures, flip)]
    with torch.no_grad():
        expected = encoder(data.normalize(data.to_float(torch.from_numpy(np.stack(pictures)))))[:, 0]
    diff = (handed[0](idx, flip) - expected).abs().max().item()
    print(f"the probe's cached features against the encoder on Pillow's mirrored images: largest difference {diff:.2e}")
    assert diff < 1e-4


def test_layer_decay_rates_per_block():
    model = Classifier(ViTConfig(depth=7), num_classes=10, pool="avg")
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["encoder.patch_embed.weight"])] == pytest.approx(0.75 ** 8)
    assert scale[id(params["encoder.cls_token"])] == pytest.approx(0.75 ** 8)
    for i in range(7):
        assert scale[id(params[f"encoder.blocks.{i}.attn.qkv.weight"])] == pytest.approx(0.75 ** (7 - i))
    assert scale[id(params["head.weight"])] == 1.0 and scale[id(params["fc_norm.weight"])] == 1.0
    assert decay[id(params["encoder.blocks.3.mlp.fc1.weight"])] == 0.05
    assert decay[id(params["encoder.blocks.3.mlp.fc1.bias"])] == 0.0 and decay[id(params["encoder.cls_token"])] == 0.0
    assert id(params["encoder.norm.weight"]) not in scale  # unused with average pooling: not trained
    # set_lr applies the scales
    opt = torch.optim.AdamW(groups, lr=1.0)
    runtime.set_lr(opt, 2.0)
    assert sorted({round(g["lr"], 6) for g in opt.param_groups}) == sorted({round(2 * 0.75 ** k, 6) for k in range(9)})


def test_finetune_receives_encoder_unchanged(pretrained, tmp_path):
    data_dir, pre = pretrained
    out = str(tmp_path / "ft")
    # lr 0: whatever the fine-tuning checkpoint holds is what arrived from pre-training
    run(["finetune.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}", f"--out_dir={out}", "--blr=0.0",
         "--epochs=1", "--batch_size=8", "--device=cpu", "--dtype=float32", "--compile=False", "--pool=avg"])
    pre_state, ft_state = load(f"{pre}/ckpt_2.pt")["model"], load(f"{out}/ckpt_last.pt")["model"]
    encoder_keys = [k for k in pre_state if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(pre_state[k], ft_state[k]) for k in encoder_keys)
    row = json.loads(open(f"{out}/results.jsonl").read().splitlines()[-1])
    assert row["method"] == "finetune" and row["pretrain_epoch"] == 2.0 and 0 <= row["top1"] <= 100


@pytest.mark.parametrize("mixup_mode", ["elem", "batch"])
def test_finetune_processes_augment_their_share_as_one_process(mixup_mode, monkeypatch):
    # Each of N processes augments only its slice and the mirror slice (mixup's partners) and keeps
    # its slice: laid end to end, the N slices must be exactly what one process makes of the batch.
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 64, 64, 3), dtype=torch.uint8)
    labels = torch.arange(12) % 5
    model = Classifier(SMALL, 5, pool="avg")
    optimizer = torch.optim.AdamW(model.parameters())

    settings = dict(batch_size=12, seed=0, crop_scale=(0.08, 1.0), rand_augment_ops=2, rand_augment_magnitude=9,
                    rand_augment_interpolation="bicubic", reprob=0.5, mixup=0.8, cutmix=1.0, mixup_mode=mixup_mode,
                    label_smoothing=0.1)
    for key, value in settings.items():
        monkeypatch.setattr(finetune, key, value)

    def augmented(rank, world_size, compile=False):
        step = finetune.make_step(model, optimizer, 5, "cpu", "float32", compile, rank=rank, world_size=world_size)
        runtime.seed_step(0, 3)
        return step.augment(images, labels)

    x, targets = augmented(0, 1)
    assert (targets.max(1).values < 0.9).any()  # some images mixed: their partners matter
    for world_size in (2, 3, 4, 6):
        parts = [augmented(rank, world_size) for rank in range(world_size)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x), world_size
        assert torch.equal(torch.cat([p[1] for p in parts]), targets), world_size
    if mixup_mode == "elem":  # compiled, the rows are gathered inside the compiled graph: still exact
        x_compiled, targets_compiled = augmented(0, 4, compile=True)
        assert torch.equal(x_compiled, x[:3]) and torch.equal(targets_compiled, targets[:3])


def test_finetune_torchrun_two_processes_train_as_one(pretrained, tmp_path):
    data_dir, pre = pretrained
    # the reference recipe has no drop path, the one draw each process makes on its own
    common = ["config/ft_ref.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}", "--epochs=1",
              "--warmup_epochs=0", "--blr=0.1", "--batch_size=8", "--device=cpu", "--dtype=float32",
              "--compile=False"]
    run(["finetune.py", *common, f"--out_dir={tmp_path}/one"])
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py", *common,
         f"--out_dir={tmp_path}/two"])
    a, b = load(f"{tmp_path}/one/ckpt_last.pt")["model"], load(f"{tmp_path}/two/ckpt_last.pt")["model"]
    start = load(f"{pre}/ckpt_2.pt")["model"]
    # Adam divides by the gradient's size, so where a gradient is ~0 rounding can flip an update's
    # sign: compare the whole change, not single weights. Rounding alone (one process run with 1
    # thread, then 2) moves it by about 3e-4 of its size; a wrong slice or sum moves it by tens of %.
    keys = [k for k in a if k.startswith("encoder.")]
    change = torch.cat([(a[k] - start[k]).flatten() for k in keys])
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    print(f"fine-tuning, 1 process vs 2 processes: the encoder's change differs by "
          f"{diff.norm() / change.norm():.2e} of its size {change.norm():.2e}")
    assert change.norm() > 1e-2 and diff.norm() < 1e-2 * change.norm()
    # config/ft_ref.py's BatchNorm head: the running statistics are the whole batch's, as one process keeps them
    for k in ("head.0.running_mean", "head.0.running_var"):
        rel = ((a[k] - b[k]).norm() / a[k].norm()).item()
        print(f"{k}: 1 process vs 2 processes differ by {rel:.2e} of its size")
        assert rel < 3e-3, k  # rounding moves the encoder, so its features, by about 3e-4


# ours, and the reference's (its BatchNorm head's running statistics must resume too)
@pytest.mark.parametrize("sig, recipe", [(signal.SIGKILL, "config/ft_tin.py"), (signal.SIGTERM, "config/ft_ref.py")])
def test_finetune_resume_after_kill_matches_uninterrupted_run(pretrained, tmp_path, sig, recipe):
    data_dir, pre = pretrained
    init = shutil.copy(f"{pre}/ckpt_2.pt", tmp_path / "init.pt")  # removed before the resume: it must not need it
    common = ["finetune.py", recipe, f"--init={init}", f"--data_dir={data_dir}", "--epochs=2",
              "--warmup_epochs=1", "--batch_size=8", "--device=cpu", "--dtype=float32", "--compile=False",
              "--log_interval=1", "--save_last_every_s=0"]
    run([*common, f"--out_dir={tmp_path}/whole"])
    # SIGTERM: no refresh on time, so ckpt_last.pt is the stop's own save
    kill_at([*common, f"--out_dir={tmp_path}/killed", *(["--save_last_every_s=1e9"] if sig == signal.SIGTERM else [])],
            "iter 8/12", sig)
    assert 0 < load(f"{tmp_path}/killed/ckpt_last.pt")["iter_num"] < 12
    assert not os.path.exists(f"{tmp_path}/killed/results.jsonl")  # a stopped run is not a result
    # started afresh by mistake, it would overwrite the resume point: refused
    result = run([*common, f"--out_dir={tmp_path}/killed"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "--resume=True" in lines[0], result.stderr
    # resumed without the first run's --init (it would have been recorded as 'scratch'): one clear line
    result = run([a for a in common if not a.startswith("--init=")] + [f"--out_dir={tmp_path}/killed", "--resume=True"],
                 check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "init='scratch' (the checkpoint's: " in lines[0], result.stderr
    # resumed on a data_dir that holds another training set: its schedule would silently change
    other = make_data(tmp_path / "other", n_train=16)
    result = run([*common, f"--out_dir={tmp_path}/killed", "--resume=True", f"--data_dir={other}"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "16 training images in data_dir (the checkpoint's: " \
        in lines[0], result.stderr
    # resumed with another head: refused, naming both
    other_head = "linear" if recipe == "config/ft_ref.py" else "batchnorm"
    result = run([*common, f"--out_dir={tmp_path}/killed", "--resume=True", f"--head={other_head}"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and f"head={other_head!r} (the checkpoint's: " \
        f"{'batchnorm' if other_head == 'linear' else 'linear'!r})" in lines[0], result.stderr
    os.remove(init)
    run([*common, f"--out_dir={tmp_path}/killed", "--resume=True"])
    a, b = load(f"{tmp_path}/whole/ckpt_last.pt"), load(f"{tmp_path}/killed/ckpt_last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert ("head.0.running_var" in a["model"]) == (recipe == "config/ft_ref.py")
    assert a["best_top1"] == b["best_top1"]
    rows = [json.loads(open(f"{tmp_path}/{r}/results.jsonl").read().splitlines()[-1]) for r in ("whole", "killed")]
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["pretrain_epoch"] == rows[1]["pretrain_epoch"] == 2.0
    # resumed once more, with nothing left to train: the same results, the best epoch's top-1 from the checkpoint
    run([*common, f"--out_dir={tmp_path}/killed", "--resume=True"])
    again = json.loads(open(f"{tmp_path}/killed/results.jsonl").read().splitlines()[-1])
    assert (again["top1"], again["best_top1"]) == (rows[1]["top1"], rows[1]["best_top1"])


def test_a_stop_asked_at_the_last_log_point_still_gives_the_results(pretrained, tmp_path):
    # one epoch, one log point (its last iteration): the run is complete when it sees the signal
    data_dir, pre = pretrained
    rest = kill_at(["finetune.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                    "--epochs=1", "--warmup_epochs=0", "--batch_size=8", "--device=cpu", "--dtype=float32",
                    "--compile=False", "--log_interval=100"], "M parameters) on", signal.SIGTERM, status=0)
    assert "stopped at" not in rest and "done: final top-1" in rest, rest
    assert len(open(f"{tmp_path}/results.jsonl").readlines()) == 2  # the plain view and the reference's
    assert load(f"{tmp_path}/ckpt_last.pt")["iter_num"] == len(np.load(f"{data_dir}/train_labels.npy")) // 8


BAD_INIT = {"missing": "not found", "a_folder": "is a folder, not a checkpoint file",
            "not_a_checkpoint": "is not a checkpoint", "wrong_architecture": "does not hold",
            "wrong_image_size": "px images",
            "fine_tuning_checkpoint": "is a fine-tuning checkpoint; give a pre-training one"}


def test_finetune_step_passes_its_settings_to_the_augmentation(monkeypatch):
    # the step's augmented batch is the crop, then RandAugment at the step's magnitude and resampling, then the
    # normalisation, each on the draws made in the step's order (no mixup, cutmix or erasing here)
    torch.manual_seed(0)
    model = Classifier(SMALL, num_classes=5, pool="avg")
    optimizer = torch.optim.AdamW(model.parameters())
    images, labels = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8), torch.arange(6) % 5
    settings = dict(batch_size=6, seed=0, crop_scale=(0.3, 1.0), rand_augment_ops=2, rand_augment_magnitude=5,
                    rand_augment_interpolation="nearest", reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    for key, value in settings.items():
        monkeypatch.setattr(finetune, key, value)
    step = finetune.make_step(model, optimizer, 5, "cpu", "float32")
    runtime.seed_step(0, 3)
    x, targets = step.augment(images, labels)
    runtime.seed_step(0, 3)
    crop, ops = data.crop_flip_draws(6, (0.3, 1.0)), augment.rand_augment_draws(6, 2)
    expected = augment.rand_augment(data.resized_crop_flip(data.to_float(images), crop), ops, magnitude=5,
                                    interpolation="nearest")
    assert torch.equal(x, data.normalize(expected))
    assert torch.equal(targets, F.one_hot(labels, 5).float())


@pytest.mark.parametrize("case", list(BAD_INIT))
def test_bad_init_is_one_clear_line(pretrained, tmp_path, case):
    data_dir, pre = pretrained
    path = str(tmp_path / "bad.pt")
    if case == "a_folder":
        os.makedirs(path)
    elif case == "not_a_checkpoint":
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    elif case in ("wrong_architecture", "wrong_image_size"):
        ckpt = load(f"{pre}/ckpt_2.pt")
        if case == "wrong_architecture":
            ckpt["model_args"]["embed_dim"] = 64
        else:
            ckpt["model_args"]["img_size"] = 32
        torch.save(ckpt, path)
    elif case == "fine_tuning_checkpoint":  # an encoder with a classifier head, not the MAE's decoder
        ckpt = load(f"{pre}/ckpt_2.pt")
        ckpt["model"] = {**{k: v for k, v in ckpt["model"].items() if k.startswith("encoder.")},
                         "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
        torch.save(ckpt, path)
    common = [f"--init={path}", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o", "--device=cpu"]
    for script, settings in [("finetune.py", ["--dtype=float32", "--batch_size=8"]),
                             ("probe.py", ["--dtype=float32", "--batch_size=8"]), ("reconstruct.py", [])]:
        result = run([script, *common, *settings], check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and path in lines[0], \
            (script, result.stderr)
        assert BAD_INIT[case] in lines[0], (script, lines[0])
        assert not os.path.exists(f"{tmp_path}/o"), script  # a failed start leaves no empty out_dir behind


@pytest.mark.parametrize("case", ["truncated_images", "no_class_list", "out_dir_under_a_file", "batch_too_large",
                                  "knn_k_too_large"])
def test_bad_data_or_settings_are_one_clear_line(pretrained, tmp_path, case):
    data_dir, pre = pretrained
    bad_data = str(tmp_path / "data")
    shutil.copytree(data_dir, bad_data)
    settings, named = [f"--out_dir={tmp_path}/o"], bad_data
    if case == "truncated_images":
        with open(f"{bad_data}/train_images.npy", "r+b") as f:
            f.truncate(1000)
    elif case == "no_class_list":
        os.remove(f"{bad_data}/meta.json")
    elif case == "out_dir_under_a_file":
        settings, named = [f"--out_dir={bad_data}/meta.json/o"], "out_dir"
    else:
        settings, named = [f"--{case.split('_too')[0]}=1000"], case.split("_too")[0]
    scripts = {"batch_too_large": ["probe.py"], "knn_k_too_large": ["probe.py"],
               "no_class_list": ["probe.py", "finetune.py"]}.get(case, ["probe.py", "finetune.py", "pretrain.py"])
    for script in scripts:
        init = [] if script == "pretrain.py" else [f"--init={pre}/ckpt_2.pt"]
        result = run([script, *init, f"--data_dir={bad_data}", "--device=cpu", "--dtype=float32", "--batch_size=8",
                      "--compile=False", *settings], check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], \
            (script, result.stderr)


@pytest.mark.parametrize("setting, value", [("pool", "max"), ("features", "last"), ("mixup_mode", "pair"),
                                            ("rand_augment_interpolation", "bilinear"), ("rand_augment_magnitude", 31),
                                            ("reprob", 1.5), ("layer_decay", 0.0), ("head", "mlp")])
def test_bad_evaluation_setting_is_one_clear_line(setting, value):
    with pytest.raises(SystemExit, match=f"^error: {setting}={value!r}: it must be ") as error:
        configurator.check_settings({setting: value})
    if setting == "head":  # the allowed values, named
        assert str(error.value).endswith("it must be one of 'linear', 'batchnorm'")
    configurator.check_settings({setting: {"pool": "avg", "features": "both", "mixup_mode": "elem", "head": "batchnorm",
                                      "rand_augment_interpolation": "nearest"}.get(setting, 0.5)})  # a good one passes


def test_eval_resize_smaller_than_the_images_is_one_clear_line(pretrained, tmp_path):
    data_dir, pre = pretrained
    result = run(["finetune.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o",
                  "--device=cpu", "--dtype=float32", "--batch_size=8", "--eval_resize=2"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: eval_resize=2"), result.stderr


def test_end_to_end_probe_finetune_plot_reconstruct(pretrained, tmp_path):
    data_dir, pre = pretrained
    out = str(tmp_path / "out")
    os.makedirs(out)
    os.symlink(pre, f"{out}/pre")
    run(["probe.py", f"--init={pre}/ckpt_[0-9]*.pt", f"--data_dir={data_dir}", f"--out_dir={out}/probe",
         "--device=cpu", "--dtype=float32", "--epochs=3", "--batch_size=8", "--eval_resize=0"])
    run(["probe.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}", f"--out_dir={out}/probe",
         "--device=cpu", "--dtype=float32", "--epochs=3", "--batch_size=8"])  # both views: plain and resize 73
    rows = [json.loads(line) for line in open(f"{out}/probe/results.jsonl")]
    plain_view = lambda epoch: [(epoch, "linear_probe", "cls, 3 ep"), (epoch, "knn", "cls, k=20")]
    assert [(r["pretrain_epoch"], r["method"], r["recipe"]) for r in rows] == plain_view(1.0) + plain_view(2.0) * 2 + \
        [(2.0, "linear_probe", "cls, 3 ep, eval resize 73"), (2.0, "knn", "cls, k=20, eval resize 73")]
    # the second view shares the head and the training features: the plain view's results are unchanged
    assert [(r["top1"], r["top5"]) for r in rows[2:4]] == [(r["top1"], r["top5"]) for r in rows[4:6]]
    probes = [r for r in rows if r["method"] == "linear_probe"]
    assert all(r["best_top1"] >= r["top1"] for r in probes)  # the best epoch includes the last
    # the kept checkpoints hold no optimizer, and the k-NN figure pre-training logged for each is probe.py's
    pre_log = [json.loads(line) for line in open(f"{pre}/log.jsonl")]
    for epoch, knn in ((1, rows[1]), (2, rows[3])):
        kept = load(f"{pre}/ckpt_{epoch}.pt")
        assert "optimizer" not in kept and kept["knn_top1"] == pre_log[epoch - 1]["knn_top1"] == knn["top1"], epoch
    run(["probe.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/crop",
         "--device=cpu", "--dtype=float32", "--epochs=1", "--batch_size=8", "--eval_resize=0", "--train_crop=True"])
    assert [r["recipe"] for r in map(json.loads, open(f"{tmp_path}/crop/results.jsonl"))] == \
        ["cls, 1 ep, crops 0.08-1", "cls, k=20"]
    result = run(["finetune.py", "config/ft_tin.py", f"--init={pre}/ckpt_2.pt", f"--data_dir={data_dir}",
                  f"--out_dir={out}/ft", "--epochs=3", "--warmup_epochs=1", "--batch_size=8", "--device=cpu",
                  "--dtype=float32", "--compile=False", "--eval_every=2", "--log_interval=1"])
    log = [json.loads(line) for line in open(f"{out}/ft/finetune_log.jsonl")]
    assert [r["epoch"] for r in log] == [2, 3] and os.path.exists(f"{out}/ft/ckpt_best.pt")  # every 2nd, and the last
    steps = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", result.stdout)]  # 6 steps an epoch
    assert [r["loss"] for r in log] == pytest.approx([np.mean(steps[6:12]), np.mean(steps[12:18])], abs=1e-4)
    ft_rows = [json.loads(line) for line in open(f"{out}/ft/results.jsonl")]  # one per view, from the last epoch
    assert [r["recipe"] for r in ft_rows] == ["tin, 3 ep", "tin, 3 ep, eval resize 73"]
    assert [(r["top1"], r["top5"]) for r in ft_rows] == [(log[-1]["top1"], log[-1]["top5"]),
                                                         (log[-1]["top1_resize73"], log[-1]["top5_resize73"])]
    assert [r["best_top1"] for r in ft_rows] == [max(r[key] for r in log) for key in ("top1", "top1_resize73")]
    best_epoch = next(r["epoch"] for r in log if r["top1"] == ft_rows[0]["best_top1"])  # ckpt_best follows the plain view
    assert load(f"{out}/ft/ckpt_best.pt")["iter_num"] == 6 * best_epoch
    result = run(["plot.py", f"--out_dir={out}"])
    assert os.path.exists(f"{out}/fig2_loss.png") and os.path.exists(f"{out}/fig3_accuracy.png")
    assert result.stdout.count("| linear_probe |") == 4 and result.stdout.count("| finetune |") == 2
    assert f"| {probes[-1]['top1']:.2f} | {probes[-1]['best_top1']:.2f} |" in result.stdout  # the best epoch's column
    picture = tmp_path / "any.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)).save(picture)
    run(["reconstruct.py", f"--init={pre}/ckpt_2.pt", str(picture), f"--out_dir={out}"])
    assert Image.open(f"{out}/reconstruct_ckpt_2.png").size[0] > 100


def test_reconstruct_reads_pictures_as_a_viewer_shows_them(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.BICUBIC))  # Pillow's own resize
    assert np.array_equal(reconstruct.load_picture(tmp_path / "rgb.png", 16), expected)
    # stored black where transparent: the left half must come out white, the opaque right half red
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, 16:] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    picture = reconstruct.load_picture(tmp_path / "rgba.png", 16).astype(int)
    assert (picture[:, :6] == 255).all() and (picture[:, 10:] == (255, 0, 0)).all()
    palette = Image.fromarray(np.zeros((32, 32), dtype=np.uint8), "P")  # every pixel index 0, index 0 transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    assert (reconstruct.load_picture(tmp_path / "palette.png", 16) == 255).all()
    # a photo stored sideways with EXIF orientation 6 ("turn 90 degrees clockwise to view") shows upright
    upright = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    assert np.array_equal(reconstruct.load_picture(tmp_path / "sideways.png", 16), expected)
    # 16-bit greyscale (0..65535) scaled to 8 bits, not clipped to white
    wide = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    eight = np.round(wide / 257).astype(np.uint8)
    expected = np.asarray(Image.fromarray(eight).convert("RGB").resize((16, 16), Image.BICUBIC))
    assert np.array_equal(reconstruct.load_picture(tmp_path / "grey16.png", 16), expected)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read image .*text.jpg"):
        reconstruct.load_picture(tmp_path / "text.jpg", 16)


def test_figure3_keeps_runs_apart_and_shows_a_checkpoints_latest_result():
    row = lambda ckpt, epoch, top1, method="linear_probe": {"checkpoint": ckpt, "pretrain_epoch": epoch,
                                                            "method": method, "recipe": "cls", "top1": top1}
    results = [row("out/tin/ckpt_100.pt", 100, 28.0), row("out/tin/ckpt_200.pt", 200, 30.0),
               row("out/tin_cpu/ckpt_6.pt", 6, 40.0), row("out/tin/ckpt_100.pt", 100, 28.5),
               row("scratch", None, 50.0, "finetune"), row("out/tin/ckpt_100.pt", 100, 60.0, "finetune")]
    assert plot.accuracy_lines(results) == {("out/tin", "finetune", "cls"): [(100, 60.0)],
                                            ("out/tin", "linear_probe", "cls"): [(100, 28.5), (200, 30.0)],
                                            ("out/tin_cpu", "linear_probe", "cls"): [(6, 40.0)]}
    # the fine-tuning from scratch is no point on a line: a level of its own
    assert plot.scratch_baselines(results + [row("scratch", None, 51.0, "finetune")]) == {"finetune (cls)": 51.0}


def test_plot_draws_every_log_and_sorts_the_table(tmp_path, monkeypatch):
    knn = {"a": [None, 20.0], "b": [None, None, None]}  # run a measured the k-NN at its epoch 2 only
    for name, losses in (("a", [1.0, 0.8]), ("b", [0.9, 0.7, 0.6])):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.jsonl").write_text("".join(
            json.dumps({"epoch": e + 1, "loss": v, "knn_top1": knn[name][e]}) + "\n" for e, v in enumerate(losses)))
    figures = []
    monkeypatch.setattr(plot, "write_png", lambda fig, path: figures.append(fig))
    plot.plot_loss([str(tmp_path / "a" / "log.jsonl"), str(tmp_path / "b" / "log.jsonl")], "unused.png")
    lines = figures[0].axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[1.0, 0.8], [0.9, 0.7, 0.6]]
    # the k-NN panel beside it: run a's one point; none for run b
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in figures[0].axes[1].get_lines()] == \
        [([2], [20.0])]
    plot.plot_loss(str(tmp_path / "b" / "log.jsonl"), "unused.png")  # no k-NN figure in the log: no panel
    assert len(figures[1].axes) == 1 and figures[1]._suptitle.get_text().endswith("b, epoch 3")
    row = lambda method, recipe, epoch: {"checkpoint": f"c{epoch}.pt", "pretrain_epoch": epoch, "method": method,
                                         "recipe": recipe, "top1": 1.0, "wall_s": 1.0, "hardware": "cpu"}
    rows = [row("linear_probe", "cls", 200), row("finetune", "tin", 100), row("linear_probe", "cls", 100),
            row("finetune", "tin", None), row("knn", "k=20", 100)]
    table = plot.markdown_table(rows).splitlines()[2:]
    assert [line.split(" | ")[1:3] for line in table] == [["none", "finetune"], ["100", "finetune"], ["100", "knn"],
                                                          ["100", "linear_probe"], ["200", "linear_probe"]]


def test_plot_errors_are_one_line_and_leave_no_temp_file(tmp_path):
    good = {"checkpoint": "c.pt", "pretrain_epoch": 1, "method": "knn", "recipe": "r", "top1": 1.0,
            "wall_s": 1.0, "hardware": "cpu"}
    for name, text, message in [("a", json.dumps(good)[:30], "line 1, is not JSON"),
                                ("b", json.dumps({**good, "pretrain_epoch": None}) + "\n{}", "line 2, lacks one of")]:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "results.jsonl").write_text(text)
        result = run(["plot.py", f"--out_dir={tmp_path / name}"], check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.jsonl").write_text(json.dumps(good))
    (tmp_path / "c" / "fig3_accuracy.png").mkdir()  # a folder where the figure goes
    result = run(["plot.py", f"--out_dir={tmp_path / 'c'}"], check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: cannot write"), result.stderr
    assert sorted(os.listdir(tmp_path / "c")) == ["fig3_accuracy.png", "results.jsonl"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
