"""
Settings for the stage scripts, nanoGPT style: each script keeps its settings as module-level
globals, then calls

    config = configure(globals(), sys.argv[1:])

Each argument is either a config file (python assignments, e.g. config/tin.py) or --key=value.
They apply in order, so `python pretrain.py config/tin.py --batch_size=128` takes the file, then
overrides one value. A key the script does not have, or a value of the wrong type, is an error.
"""
import ast
import sys

SETTING_TYPES = (bool, int, float, str, tuple)


def settings(namespace):
    """The script's settings: its public globals of plain types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and type(v) in SETTING_TYPES}


def checked(key, value, known, source):
    if key not in known:
        raise SystemExit(f"error: unknown setting {key!r} in {source}; known settings: {', '.join(sorted(known))}")
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
    known = settings(namespace)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"error: expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --device=cuda
            if type(known.get(key)) is str and type(value) is not str:
                value = text  # --init=700 or --out_dir=1e3 still name a path
            namespace[key] = known[key] = checked(key, value, known, arg)
        else:
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise SystemExit(f"error: cannot read config file {arg}: {e.strerror}")
            values = {}  # one namespace, so a comprehension in the file sees the file's earlier settings
            exec(compile(code, arg, "exec"), values)
            for key, value in values.items():
                if not key.startswith("_") and not isinstance(value, type(sys)):  # skip imports
                    namespace[key] = known[key] = checked(key, value, known, arg)
    return dict(known)
