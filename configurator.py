"""
Command-line config, nanoGPT style:

    python train.py config/tiny.py --max_iters=100 --attention=rope

An argument without '=' is a config file: Python that assigns keys (it may read the defaults; names starting with
'_' are private to it). An argument --key=value sets one key, the value parsed as a Python literal ('--compile=False',
'--n_layer=6', '--learning_rate=3e-4'); a key with a string default takes the text as it is. Every key must already
have a default, and a new value must have the default's type (an int is fine for a float; a None default takes
anything). Mistakes end the program with a one-line message naming the key. A tool that reads a training config for
some of its keys only (bench/bench_train.py) passes skip_unknown=True.
"""
import ast
import types


def apply_overrides(argv, config, skip_unknown=False):
    """Update the dict of defaults `config` from the arguments `argv` (e.g. sys.argv[1:]), in order."""
    for arg in argv:
        if arg.startswith('--'):
            key, equals, text = arg[2:].partition('=')
            if not equals:
                raise SystemExit(f'config error: {arg!r}: expected --key=value')
            if isinstance(config.get(key), str):
                value = text
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text
            _set(config, key, value, arg, skip_unknown)
        else:
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise SystemExit(f'config error: cannot read config file {arg!r} ({e.strerror})')
            namespace = dict(config)
            try:
                exec(compile(source, arg, 'exec'), namespace)
            except Exception as e:  # the file's own mistake: say where, not how exec got there
                raise SystemExit(f'config error: config file {arg!r} fails: {type(e).__name__}: {e}')
            for key, value in namespace.items():
                if not key.startswith('_') and not isinstance(value, types.ModuleType):
                    _set(config, key, value, arg, skip_unknown)
    return config


def _set(config, key, value, where, skip_unknown):
    if key not in config:
        if skip_unknown:
            return
        raise SystemExit(f'config error: {where}: unknown config key {key!r}')
    default = config[key]
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if default is not None and type(value) is not type(default):
        raise SystemExit(f'config error: {where}: {key} must be a {type(default).__name__} like its default '
                         f'{default!r}, got {value!r} ({type(value).__name__})')
    config[key] = value
