"""
Settings for the scripts, nanoGPT style: each script keeps its settings as module-level globals between two
rulers, then calls

    config = configure(globals(), sys.argv[1:])

Each argument is either a config file (python assignments, e.g. config/tin.py) or --key=value. They apply in
order, so `python pretrain.py config/tin.py --batch_size=128` takes the file, then overrides one value. A key
the script does not have, a value of the wrong type, or a value out of range (SETTING_RULES; a script's own
defaults may be sentinels, as bench.py's batch_size=0) is a one-line error; --help lists the settings.
check_same_run keeps a resumed run on its own settings.
"""
import ast
import difflib
import os
import re
import sys
import traceback

import augment
from model import HEADS

SETTING_TYPES = (bool, int, float, str, tuple)

def settings(namespace):
    """The script's settings: its public lower-case globals of plain types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and type(v) in SETTING_TYPES}

def print_help(namespace):
    """The script's usage (its docstring), then its settings block with each default and comment."""
    lines = [namespace["__doc__"].strip(), "", "settings (config files, then --key=value, in order):"]
    known = settings(namespace)
    with open(namespace["__file__"]) as f:
        block = f.read().split("\n# " + "-" * 77 + "\n")[1]  # between the rulers
    for line in block.splitlines():
        match = re.match(r"(\w+) = .*?(?:  # (.*))?$", line)
        if match and match[1] in known:
            lines.append((f"  --{match[1]}={known[match[1]]}".ljust(32) + f"  {match[2] or ''}").rstrip())
        elif line.startswith("# "):
            lines.append(f" {line[2:]}")
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # --help | head: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)

def checked(key, value, known, source):
    if key not in known:
        guess = difflib.get_close_matches(key, known, n=1)
        raise SystemExit(f"error: unknown setting {key!r} in {source}; "
                         f"{f'did you mean {guess[0]!r}? ' if guess else ''}see --help")
    want = type(known[key])
    if want is float and type(value) is int:  # 1 where 1.0 was meant is fine
        value = float(value)
    if want is tuple and type(value) is list:
        value = tuple(value)
    if type(value) is not want:
        raise SystemExit(f"error: setting {key} in {source} must be {want.__name__}, "
                         f"got {value!r} ({type(value).__name__})")
    return value

def configure(namespace, argv):
    """Apply config files and --key=value overrides to the globals in namespace; return the final
    settings as a dict (what checkpoints record)."""
    known, given = settings(namespace), set()
    if {"-h", "--help"} & set(argv):
        print_help(namespace)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"error: expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError):  # TypeError: an unhashable key, as in {[1]: 2}
                value = text  # a bare word is a string: --device=cuda
            if type(known.get(key)) is str and type(value) is not str:
                value = text  # --init=700 or --out_dir=1e3 still name a path
            namespace[key] = known[key] = checked(key, value, known, arg)
            given.add(key)
        else:
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise SystemExit(f"error: cannot read config file {arg}: {e.strerror}")
            values = {}  # one namespace, so a comprehension in the file sees the file's earlier settings
            try:
                exec(compile(code, arg, "exec"), values)
            except Exception as e:  # a syntax error, an undefined name, ...: the file's own fault
                lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg]
                line = getattr(e, "lineno", None) or (lines[-1] if lines else "?")  # the file's innermost
                raise SystemExit(f"error: config file {arg}, line {line}: {type(e).__name__}: {e}")
            for key, value in values.items():
                if not key.startswith("_") and not isinstance(value, type(sys)):  # skip imports
                    namespace[key] = known[key] = checked(key, value, known, arg)
                    given.add(key)
    check_settings(known, given)
    return dict(known)

# the allowed values of the settings, each checked where a script has it: a bad value is one line naming it,
# not a traceback (or a silently wrong run) later
positive, non_negative = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
one_of = lambda *allowed: (lambda v: v in allowed, f"one of {', '.join(map(repr, allowed))}")
KERNEL, PART = r"(flash|efficient|cudnn|math)", r"(encoder|decoder)"
SETTING_RULES = {
    **{key: positive for key in (
        "batch_size", "epochs", "log_interval", "save_every", "eval_every", "eval_batch_size", "knn_k",
        "knn_temperature", "num_images", "layer_decay", "patch_size", "embed_dim", "depth", "num_heads",
        "mlp_ratio", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "steps_per_repeat",
        "repeats")},
    **{key: non_negative for key in (
        "warmup_epochs", "blr", "weight_decay", "max_iters", "clip_grad", "mixup", "cutmix",
        "rand_augment_ops", "eval_resize", "save_last_every_s", "knn_every", "knn_train_images", "warmup",
        "peak_tflops")},
    **{key: (lambda v: 0 <= v < 1, "in [0, 1)") for key in ("beta1", "beta2", "drop_path",
                                                          "label_smoothing")},
    "reprob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "mask_ratio": (lambda v: 0 < v < 1, "in (0, 1)"),
    "rand_augment_magnitude": (lambda v: 0 <= v <= 30, "in [0, 30] (31 bins, as torchvision)"),
    "rand_augment_interpolation": one_of(*augment.INTERPOLATIONS),
    "mixup_mode": one_of(*augment.MIXUP_MODES),
    "pool": one_of("cls", "avg"),
    "head": one_of(*HEADS),
    "features": one_of("cls", "avg", "both"),
    "dtype": one_of("float32", "bfloat16"),
    "stage": one_of("pretrain", "finetune"),
    "attention": (lambda v: re.fullmatch(rf"auto|{KERNEL}|{PART}={KERNEL}(,{PART}={KERNEL})?", v),
                  "'auto', one of flash, efficient, cudnn, math, or 'encoder=NAME,decoder=NAME'"),
    "crop_scale": (lambda v: len(v) == 2 and all(type(s) in (int, float) for s in v)
                   and 0 < v[0] <= v[1] <= 1, "two numbers (min, max) with 0 < min <= max <= 1"),
}

def check_settings(config, given=None):
    """The values of the keys in given (all of config's by default) against SETTING_RULES."""
    given = config.keys() if given is None else given
    for key, (ok, allowed) in SETTING_RULES.items():
        if key in given and not ok(config[key]):
            raise SystemExit(f"error: {key}={config[key]!r}: it must be {allowed}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        # whole heads, and the sin-cos position embedding in fours
        if {width, heads} & set(given) and config[width] % (4 * config[heads]):
            raise SystemExit(f"error: {width}={config[width]} must be a multiple of 4 x {heads} "
                             f"({4 * config[heads]})")

# what a resumed run may change: where files go, how often it logs and saves, and how the steps run
RESUME_FREE = {"data_dir", "out_dir", "resume", "log_interval", "save_every", "save_last_every_s",
               "max_iters", "eval_every", "eval_batch_size", "knn_every", "device", "dtype", "compile",
               "cuda_graph", "attention"}

def check_same_run(ckpt, config, path, num_train):
    """A resumed run must go on as the run that wrote the checkpoint: every other setting must be the
    checkpoint's, and data_dir (which may move) must hold as many training images, or the schedule, the
    optimizer or the results would silently mix two runs."""
    saved = ckpt.get("config", {})
    changed = [f"{key}={config[key]!r} (the checkpoint's: {saved[key]!r})" for key in config
               if key not in RESUME_FREE and key in saved and saved[key] != config[key]]
    if ckpt.get("num_train", num_train) != num_train:
        changed.append(f"{num_train:,} training images in data_dir (the checkpoint's: {ckpt['num_train']:,})")
    if changed:
        raise SystemExit(f"error: {path} was made with other settings: {', '.join(changed)}; resume with the "
                         f"settings (config file and flags) of the run that made it, or start a new out_dir")
