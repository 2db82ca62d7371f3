"""
pretrain.py end to end on the CPU with a tiny model and generated data: checkpoints, exact resume
after kill -9, SIGTERM or Ctrl-C, two-process torchrun, a diverging run, the configurator's errors.
Run with `python test_pretrain.py` or pytest.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import runtime
from configurator import configure
from model import MAE, ViTConfig, param_groups

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--patch_size=8", "--embed_dim=32", "--depth=1", "--num_heads=2", "--decoder_embed_dim=32",
        "--decoder_depth=1", "--decoder_num_heads=2", "--batch_size=8", "--epochs=3", "--warmup_epochs=1",
        "--device=cpu", "--dtype=float32", "--compile=False", "--log_interval=2", "--blr=1e-3"]


def make_data(folder, n_train=32, n_val=8, classes=4):
    """A packed data set like prepare_tin.py writes, with random images."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        np.save(os.path.join(folder, f"{split}_images.npy"), rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))
        np.save(os.path.join(folder, f"{split}_labels.npy"), (np.arange(n) % classes).astype(np.int16))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"classes": [f"c{i}" for i in range(classes)], "names": [f"class {i}" for i in range(classes)],
                   "num_train": n_train, "num_val": n_val, "source": "generated"}, f)
    return str(folder)


# one thread each: two processes share two cores in the torchrun test, and float sums depend on
# how a matrix product is split between threads, so every run must split them alike
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(args, check=True):
    result = subprocess.run([sys.executable] + args, cwd=HERE, capture_output=True, text=True, env=ENV, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def kill_at(args, marker, sig=signal.SIGKILL, status=None):
    """Run a script and send it sig when its output shows marker. Returns the rest of its output.
    A kill -9 ends it at once; SIGTERM and Ctrl-C (SIGINT) stop it at its next log point, after
    saving, with the exit status a kill by that signal would give (or `status`: torchrun's own)."""
    proc = subprocess.Popen([sys.executable] + args, cwd=HERE, stdout=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    expected = status if status is not None else -sig if sig == signal.SIGKILL else 128 + sig
    assert proc.returncode == expected, f"{args}: exit status {proc.returncode}, not {expected}:\n{rest}"
    return rest


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_pretrain_writes_checkpoints_logs_and_pictures(data_dir, tmp_path):
    out = str(tmp_path / "run")
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--save_every=2",
                  "--log_interval=1"])
    assert "ETA" in result.stdout and "img/s" in result.stdout
    # each epoch's logged loss is the mean of its 4 steps' losses, as the progress lines print them
    steps = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", result.stdout)]
    assert len(steps) == 12
    for name in ("ckpt_2.pt", "ckpt_3.pt", "ckpt_last.pt", "log.jsonl", "loss.png", "recon_2.png", "recon_3.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "ckpt_1.pt"))
    ckpt = load(os.path.join(out, "ckpt_3.pt"))  # weights_only=True: plain tensors and containers only
    assert ckpt["iter_num"] == 12 and ckpt["epoch"] == 3.0 and ckpt["model_args"]["embed_dim"] == 32
    # a kept checkpoint holds the weights and the k-NN figure, not the optimizer: ckpt_last.pt is the one to resume
    last = load(os.path.join(out, "ckpt_last.pt"))
    assert ckpt["config"]["batch_size"] == 8 and "optimizer" not in ckpt and "state" in last["optimizer"]
    assert os.path.getsize(os.path.join(out, "ckpt_3.pt")) <= 0.5 * os.path.getsize(os.path.join(out, "ckpt_last.pt"))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    # the k-NN monitor measured at each kept checkpoint only (knn_every=100), and the checkpoint has the figure
    assert [r["knn_top1"] is not None for r in log] == [False, True, True] and ckpt["knn_top1"] == log[2]["knn_top1"]
    assert re.search(rf"k-NN top-1 {log[1]['knn_top1']:.1f}% \(20-NN, [0-9]+ s\)", result.stdout), result.stdout
    assert [r["loss"] for r in log] == pytest.approx([np.mean(steps[i:i + 4]) for i in (0, 4, 8)], abs=1e-4)
    assert [f for f in os.listdir(out) if ".tmp" in f] == []


def test_warmup_starts_at_lr_0_and_max_iters_stops_without_changing_the_schedule(data_dir, tmp_path):
    # the lr is set before each step: the warm-up's first step, at lr 0, leaves the initial weights as they were
    common = ["pretrain.py", *TINY, f"--data_dir={data_dir}"]
    run([*common, f"--out_dir={tmp_path}/one", "--max_iters=1"])
    torch.manual_seed(0)  # as the script seeds, before it builds the model
    init = MAE(ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                         decoder_depth=1, decoder_num_heads=2)).state_dict()
    one = load(f"{tmp_path}/one/ckpt_last.pt")["model"]
    assert one.keys() == init.keys() and all(torch.equal(one[k], init[k]) for k in init)
    # stopped by max_iters after 6 of 12 iterations, then resumed to the end: the uninterrupted run, bit for bit
    run([*common, f"--out_dir={tmp_path}/whole"])
    run([*common, f"--out_dir={tmp_path}/part", "--max_iters=6"])
    assert load(f"{tmp_path}/part/ckpt_last.pt")["iter_num"] == 6
    run([*common, f"--out_dir={tmp_path}/part", "--resume=True", "--max_iters=0"])
    a, b = load(f"{tmp_path}/whole/ckpt_last.pt")["model"], load(f"{tmp_path}/part/ckpt_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_resume_after_kill_matches_uninterrupted_run(data_dir, tmp_path, sig):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={whole}", "--save_every=1"])
    # stopped part way through the second epoch. kill -9: ckpt_last.pt is refreshed at every log point.
    # SIGTERM, Ctrl-C: never refreshed on time, so the stop's own save is the only one
    refresh = "--save_last_every_s=0" if sig == signal.SIGKILL else "--save_last_every_s=1e9"
    rest = kill_at(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={killed}", "--log_interval=1",
                    refresh, "--save_every=1"], "iter 6/12", sig)
    stopped_at = load(os.path.join(killed, "ckpt_last.pt"))["iter_num"]
    assert 4 <= stopped_at < 12  # killed within the second epoch, not at the end
    if sig != signal.SIGKILL:
        assert f"{signal.Signals(sig).name}: stopped at iteration {stopped_at} of 12" in rest, rest
    else:  # the log may run ahead of ckpt_last.pt, and a kill -9 can land while a line is being written
        with open(os.path.join(killed, "log.jsonl"), "a") as f:
            f.write('{"epoch": 2, "loss": 9.0}\n{"epoch": 3, "lo')
    resumed = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={killed}", "--resume=True",
                   "--save_every=1"])
    first = resumed.stdout.splitlines()[0]  # a resume says where it starts
    assert first == f"resuming {killed}/ckpt_last.pt at iteration {stopped_at}, epoch {stopped_at / 4:.1f} of 3", first
    a, b = load(os.path.join(whole, "ckpt_last.pt")), load(os.path.join(killed, "ckpt_last.pt"))
    assert a["iter_num"] == b["iter_num"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg_sq"], b["optimizer"]["state"][0]["exp_avg_sq"])
    log_a = [json.loads(line) for line in open(os.path.join(whole, "log.jsonl"))]
    log_b = [json.loads(line) for line in open(os.path.join(killed, "log.jsonl"))]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-6)
    # one k-NN figure per kept checkpoint (epoch 1 before the stop, 2 and 3 after), none repeated or lost
    assert [(r["epoch"], r["knn_top1"]) for r in log_b] == [(r["epoch"], r["knn_top1"]) for r in log_a]
    assert [r["epoch"] for r in log_b if r["knn_top1"] is not None] == [1, 2, 3]


def test_ctrl_c_answers_at_once_and_a_second_one_stops_now(tmp_path):
    # the reference model on 400 images: 50 iterations an epoch, seconds apart, and log points only at epoch ends
    data_dir = make_data(tmp_path / "data", n_train=400)
    common = ["pretrain.py", f"--data_dir={data_dir}", "--batch_size=8", "--epochs=2", "--warmup_epochs=1",
              "--log_interval=1000", "--save_last_every_s=0", "--knn_every=0", "--device=cpu", "--dtype=float32",
              "--compile=False"]
    out = str(tmp_path / "stopped")
    proc = subprocess.Popen([sys.executable, *common, f"--out_dir={out}"], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if "iter 50/100" in line:  # the first log point: ckpt_last.pt holds iteration 50
            break
    while not os.path.exists(f"{out}/ckpt_last.pt"):
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    notice = proc.stdout.readline()
    assert time.time() - sent < 5 and notice.startswith(f"SIGINT: saving {out}/ckpt_last.pt at iteration 100 (the "
                                                       f"next progress line), then stopping; Ctrl-C again"), notice
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    rest, errors = proc.communicate(timeout=15)
    assert time.time() - sent < 15 and proc.returncode == 128 + signal.SIGINT, (rest, errors)
    assert rest.strip().splitlines() == [f"SIGINT again: stopped now; {out}/ckpt_last.pt holds iteration 50, continue "
                                         f"with --resume=True"] and "Traceback" not in errors, (rest, errors)
    assert [f for f in os.listdir(out) if ".tmp" in f] == [] and load(f"{out}/ckpt_last.pt")["iter_num"] == 50
    # what it left resumes to the uninterrupted run, exactly
    run([*common, f"--out_dir={out}", "--resume=True"])
    run([*common, f"--out_dir={tmp_path}/whole"])
    a, b = load(f"{tmp_path}/whole/ckpt_last.pt")["model"], load(f"{out}/ckpt_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_asked_at_the_last_log_point_ends_the_run_as_done(data_dir, tmp_path):
    # one epoch, one log point (its last iteration): nothing is left to resume
    rest = kill_at(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--epochs=1",
                    "--log_interval=100"], "MAE ", signal.SIGTERM, status=0)
    assert "stopped at" not in rest and "done: at iteration 4 of 4" in rest, rest
    assert load(os.path.join(tmp_path, "ckpt_last.pt"))["iter_num"] == 4


def test_torchrun_two_processes_train_as_one(data_dir, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # an lr large enough that the weights move far more than rounding can move them; the second
    # epoch's change (ckpt_1 to the end) is the yardstick
    common = [*TINY, f"--data_dir={data_dir}", "--epochs=2", "--warmup_epochs=0", "--blr=0.1", "--save_every=1"]
    run(["pretrain.py", *common, f"--out_dir={one}"])
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py", *common, f"--out_dir={two}"])
    a, b = load(os.path.join(one, "ckpt_last.pt"))["model"], load(os.path.join(two, "ckpt_last.pt"))["model"]
    start = load(os.path.join(one, "ckpt_1.pt"))["model"]
    # the same global batches, crops and masks: only the gradient sums' rounding differs. Adam divides by
    # the gradient's size, so where a gradient is ~0 rounding can flip an update's sign: compare the whole
    # change, not single weights (as the fine-tuning test in test_eval.py does)
    change = torch.cat([(a[k] - start[k]).flatten() for k in a])
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    print(f"pre-training, 1 process vs 2 processes: the weights differ by {diff.norm() / change.norm():.2e} of "
          f"the second epoch's change {change.norm():.2e}")
    assert change.norm() > 1e-2 and diff.norm() < 1e-2 * change.norm()
    # the logged loss is the whole batch's (the processes' mean), not rank 0's half; the k-NN figure the same
    log_a, log_b = ([json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (one, two))
    assert [r["loss"] for r in log_b] == pytest.approx([r["loss"] for r in log_a], rel=1e-5)
    assert [r["knn_top1"] for r in log_b] == [r["knn_top1"] for r in log_a] and log_a[0]["knn_top1"] is not None


def test_torchrun_processes_stop_together_on_sigterm(data_dir, tmp_path):
    # torchrun passes its SIGTERM on to both processes; they agree at the next log point and rank 0 saves.
    # 1000 epochs, which a working stop never reaches: on a busy machine the signal can land seconds late
    out = str(tmp_path / "two")
    rest = kill_at(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py", *TINY,
                    f"--data_dir={data_dir}", f"--out_dir={out}", "--epochs=1000", "--log_interval=1",
                    "--save_last_every_s=1e9"], "iter 6/4000", signal.SIGTERM, status=1)  # torchrun: 1 on a signal
    stopped_at = load(os.path.join(out, "ckpt_last.pt"))["iter_num"]
    assert 6 <= stopped_at < 4000 and f"SIGTERM: stopped at iteration {stopped_at} of 4000" in rest, rest


@pytest.mark.parametrize("refresh", [0, 1e9])
def test_diverging_run_stops_and_says_what_ckpt_last_holds(data_dir, tmp_path, refresh):
    # at this lr the first update already gives weights whose loss is not finite
    out = str(tmp_path / "nan")
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--blr=1e30",
                  "--warmup_epochs=0", "--log_interval=1", f"--save_last_every_s={refresh}"], check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    if refresh == 0:  # saved at every log point, so ckpt_last.pt holds the state that gave the loss: not good
        assert message == f"error: loss is nan at iteration 1; {out}/ckpt_last.pt holds the state that gave it " \
                          f"(iteration 1): start again with other settings", message
        assert load(os.path.join(out, "ckpt_last.pt"))["iter_num"] == 1
    else:
        assert message == "error: loss is nan at iteration 1; this run has not saved ckpt_last.pt yet", message


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_save_cut_short_leaves_the_earlier_file_and_no_temporary_one(tmp_path, monkeypatch, stop):
    # a second Ctrl-C raises SystemExit wherever the loop is, in the middle of torch.save too
    path = str(tmp_path / "ckpt_last.pt")
    runtime.save_atomic({"iter_num": 1}, path)

    def cut_short(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise stop()
    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(stop):
        runtime.save_atomic({"iter_num": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt_last.pt"] and load(path) == {"iter_num": 1}


def test_divergence_guard_checks_the_losses_and_the_last_update():
    model, window = torch.nn.Linear(2, 2), torch.tensor([0.5, 0.25, float("inf"), 0.0])
    with pytest.raises(SystemExit, match=r"^error: loss is inf at iteration 12; p keeps the last good state "
                                         r"\(iteration 10\)$"):  # the loss of iteration 10 was finite
        runtime.checked_losses(window, 3, 10, model, "p", 10)
    assert runtime.checked_losses(window, 2, 10, model, "p", 10) == [0.5, 0.25]
    with torch.no_grad():
        model.weight[0, 1] = float("nan")  # what an update with an infinite gradient leaves
    with pytest.raises(SystemExit, match=r"^error: the weights are not finite after iteration 12; p keeps the last "
                                         r"good state \(iteration 10\)$"):
        runtime.checked_losses(window, 2, 10, model, "p", 10)


@pytest.mark.parametrize("setting, value", [("log_interval", "0"), ("save_every", "0"), ("batch_size", "0"),
                                            ("crop_scale", "(1.0,0.2)"), ("crop_scale", "(0.2,)"),
                                            ("mask_ratio", "1.5"), ("warmup_epochs", "-1"), ("embed_dim", "30"),
                                            ("beta2", "1.0")])
def test_bad_setting_is_one_clear_line(data_dir, tmp_path, setting, value):
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", f"--{setting}={value}"],
                 check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {setting}="), result.stderr


def test_resume_with_other_settings_is_one_clear_line(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--epochs=1"])
    # a fresh run into the same folder would overwrite the run's checkpoint and log: refused
    before = open(os.path.join(out, "log.jsonl")).read()
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--epochs=1"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "already holds a run" in lines[0], result.stderr
    assert "--resume=True" in lines[0] and open(os.path.join(out, "log.jsonl")).read() == before
    # what the run's settings shape (weight decay, the batch) may not change; how often it logs may
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--epochs=1",
                  "--resume=True", "--weight_decay=0.5", "--batch_size=4"], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "weight_decay=0.5 (the checkpoint's: 0.15)" in lines[0] and "batch_size=4 (the checkpoint's: 8)" in lines[0]
    # the schedule's length and shape, the seed, the model: refused too (configurator.RESUME_FREE lists what is not)
    shaping = ["--epochs=2", "--warmup_epochs=0", "--seed=1", "--mask_ratio=0.5", "--depth=2", "--crop_scale=(0.5,1.0)"]
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--resume=True", *shaping],
                 check=False)
    named = re.findall(r"[:,] (\w+)=", result.stderr)  # "...other settings: epochs=2 (the checkpoint's: 3), ..."
    assert result.returncode == 1 and sorted(named) == sorted(flag[2:].split("=")[0] for flag in shaping), result.stderr
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--epochs=1",
                  "--resume=True", "--log_interval=3"])
    assert "done: at iteration 4 of 4" in result.stdout  # the run had ended: nothing left to train


def test_schedule_is_the_official_per_iteration_warmup_cosine(data_dir, tmp_path):
    # each epoch's log line has the lr of its last iteration, as get_lr gave it to AdamW: against the official
    # lr_sched.adjust_learning_rate with fractional epochs (TINY: 4 iterations an epoch, 1 warm-up epoch)
    import math
    run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--epochs=4", "--warmup_epochs=2"])
    lr, warmup_epochs, epochs = 1e-3 * 8 / 256, 2, 4
    for row in map(json.loads, open(os.path.join(tmp_path, "log.jsonl"))):
        epoch = (row["epoch"] * 4 - 1) / 4  # the epoch's last iteration
        if epoch < warmup_epochs:
            expected = lr * epoch / warmup_epochs
        else:
            expected = lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
        assert row["lr"] == pytest.approx(expected, rel=1e-12), row


def test_cuda_graph_run_state_resumes_in_a_plain_run():
    # a CUDA-graph run's optimizer keeps its lr as a device tensor and capturable=True; the state dict
    # of such a run (made here by hand, on the CPU) must load into an ordinary optimizer and step it
    from runtime import load_optimizer
    param = torch.nn.Parameter(torch.ones(4))
    graph_run = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    graph_run.step()
    state = graph_run.state_dict()
    state["param_groups"][0].update(lr=torch.tensor(0.05), capturable=True)
    plain = torch.optim.AdamW([param], lr=0.1)
    load_optimizer(plain, state)
    group = plain.param_groups[0]
    assert group["lr"] == pytest.approx(0.05) and type(group["lr"]) is float and group["capturable"] is False
    plain.step()  # a tensor lr or capturable=True would raise here on the CPU
    assert torch.allclose(plain.state[param]["exp_avg"], torch.full((4,), 0.9 * 0.1 + 0.1))  # the moments came along


@pytest.mark.parametrize("script", ["pretrain.py", "probe.py", "finetune.py"])
def test_cuda_graph_on_the_cpu_is_one_clear_error(script, tmp_path):
    # the setting is checked before any data or checkpoint is read
    result = run([script, "--device=cpu", "--cuda_graph=True", f"--out_dir={tmp_path}"]
                 + (["--init=ckpt.pt"] if script == "probe.py" else []), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: cuda_graph=True needs a CUDA device, not device='cpu'"


def test_seed_step_draws_depend_on_seed_iteration_and_stream():
    def draws(*args):
        runtime.seed_step(*args)
        return torch.rand(8)
    assert torch.equal(draws(0, 7), draws(0, 7))  # what a resumed run draws again
    others = [draws(0, 7), draws(0, 8), draws(1, 7), draws(0, 7, 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(others) for b in others[i + 1:])


def test_param_groups_decay_the_weight_matrices_only():
    mae = MAE(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                        decoder_depth=1, decoder_num_heads=2))
    decay, no_decay = param_groups(mae, 0.15)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.15, 0.0)
    # by module type, not by shape: every bias, every LayerNorm parameter is left undecayed
    expected = {id(p) for m in mae.modules() for name, p in m.named_parameters(recurse=False)
                if name == "bias" or isinstance(m, torch.nn.LayerNorm)}
    assert {id(p) for p in no_decay["params"]} == expected
    everything = [id(p) for p in mae.parameters() if p.requires_grad]
    assert sorted(id(p) for p in decay["params"] + no_decay["params"]) == sorted(everything)  # each once


def test_without_random_crop_the_view_is_the_image_or_its_mirror(monkeypatch):
    # random_crop=False, as the reference's code pre-trains: each image whole, mirrored where its coin says
    import data
    import pretrain
    torch.manual_seed(0)
    model = MAE(ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                          decoder_depth=1, decoder_num_heads=2))
    images = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8)
    for key, value in dict(random_crop=False, batch_size=16, patch_size=8).items():
        monkeypatch.setattr(pretrain, key, value)
    step = pretrain.make_step(model, torch.optim.AdamW(model.parameters()), "cpu", "float32")
    runtime.seed_step(0, 5)
    views, _ = step.augment(images)
    plain = data.normalize(data.to_float(images))
    mirrored = [torch.equal(v, torch.flip(p, dims=[2])) for v, p in zip(views, plain)]
    unchanged = [torch.equal(v, p) for v, p in zip(views, plain)]
    assert all(m != u for m, u in zip(mirrored, unchanged)) and 0 < sum(mirrored) < 16, (mirrored, unchanged)
    # the default crops: not one image is left whole
    monkeypatch.setattr(pretrain, "random_crop", True)
    step = pretrain.make_step(model, torch.optim.AdamW(model.parameters()), "cpu", "float32")
    runtime.seed_step(0, 5)
    views, _ = step.augment(images)
    assert not any(torch.equal(v, p) or torch.equal(v, torch.flip(p, dims=[2])) for v, p in zip(views, plain))


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "probe.py", "reconstruct.py", "plot.py", "bench.py"])
def test_help_lists_every_setting_with_its_default(script):
    import importlib.util
    from configurator import settings
    result = run([script, "--help"])
    spec = importlib.util.spec_from_file_location("fresh", os.path.join(HERE, script))  # the defaults, untouched
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in settings(vars(module)).items():
        assert re.search(rf"^  --{key}={re.escape(str(value))}( |$)", result.stdout, re.MULTILINE), (key, value)
    assert result.stdout.startswith(module.__doc__.strip()[:40]) and "python " + script in result.stdout
    result = run([script, "--batchsize=8"], check=False)
    assert result.returncode == 1 and result.stderr.strip().endswith("see --help"), result.stderr


@pytest.mark.parametrize("setting, message", [("knn_k=33", "knn_k=33 neighbours among 32 training images"),
                                              ("knn_train_images=10", "knn_k=20 neighbours among 10 training images"),
                                              ("knn_temperature=0.0", "knn_temperature=0.0: it must be > 0")])
def test_bad_knn_setting_is_one_line_before_training(data_dir, tmp_path, setting, message):
    result = run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o", f"--{setting}"],
                 check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
    assert "iter" not in result.stdout and not os.path.exists(f"{tmp_path}/o")


def test_a_gpu_sized_run_on_a_cpu_says_so_at_start(data_dir, tmp_path):
    # 6.4 million images to train on: a line at start (and the run goes on: killed here once it is seen)
    rest = kill_at(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--epochs=200000"],
                   "MAE ", signal.SIGKILL)
    assert rest.startswith("warning: ") and "take days" in rest and "config/tin_cpu.py" in rest, rest
    assert "take days" not in run(["pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}/b"]).stdout


def test_configurator_rejects_unknown_keys_and_wrong_types(tmp_path):
    ns = {"batch_size": 256, "blr": 5e-4, "device": "cpu", "compile": True, "crop_scale": (0.2, 1.0)}
    config = configure(ns, ["--batch_size=64", "--blr=1", "--device=cuda", "--compile=False", "--crop_scale=[0.5,1]"])
    assert config == {"batch_size": 64, "blr": 1.0, "device": "cuda", "compile": False, "crop_scale": (0.5, 1.0)}
    assert ns["batch_size"] == 64
    with pytest.raises(SystemExit, match="unknown setting 'batch'"):
        configure(dict(ns), ["--batch=64"])
    with pytest.raises(SystemExit, match="batch_size .* must be int"):
        configure(dict(ns), ["--batch_size=6.5"])
    with pytest.raises(SystemExit, match="compile .* must be bool"):
        configure(dict(ns), ["--compile=1"])
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 32\nlearning_rate = 1.0\n")
    with pytest.raises(SystemExit, match="unknown setting 'learning_rate' in .*c.py"):
        configure(dict(ns), [str(cfg_file)])
    with pytest.raises(SystemExit, match="cannot read config file"):
        configure(dict(ns), [str(tmp_path / "missing.py")])
    # a config file's later settings may be computed from its earlier ones, in a comprehension too
    cfg_file.write_text("blr = 1e-3\ncrop_scale = tuple(s * blr * 1000 for s in (0.5, 1.0))\n")
    assert configure(dict(ns), [str(cfg_file)])["crop_scale"] == (0.5, 1.0)
    # files and flags apply in the order given: the last one wins
    later = tmp_path / "later.py"
    cfg_file.write_text("batch_size = 32\nblr = 1e-3\n")
    later.write_text("batch_size = 16\n")
    assert configure(dict(ns), [str(cfg_file), str(later)])["batch_size"] == 16
    assert configure(dict(ns), [str(later), str(cfg_file), "--batch_size=8"])["batch_size"] == 8
    assert configure(dict(ns), ["--batch_size=8", str(later)])["batch_size"] == 16
    # a broken config file is one line naming it and the line, not a traceback
    for text, error in [("blr = (\n", "line 1: SyntaxError"), ("batch_size = 32\nblr = lr * 2\n", "line 2: NameError"),
                        ("def f():\n    return lr\nblr = f()\n", "line 2: NameError"), ("blr = 1\0\n", "line \\?: ")]:
        cfg_file.write_text(text)
        with pytest.raises(SystemExit, match=f"^error: config file {re.escape(str(cfg_file))}, {error}"):
            configure(dict(ns), [str(cfg_file)])
    with pytest.raises(SystemExit, match="crop_scale .* must be tuple, got '{\\[1\\]: 2}'"):
        configure(dict(ns), ["--crop_scale={[1]: 2}"])  # literal_eval's TypeError: a string, then the wrong type


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
