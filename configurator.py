"""
Command-line config, nanoGPT style:

    python train.py config/tiny.py --max_iters=100 --attention=rope

An argument without '=' is a config file: Python that assigns keys (it may read the defaults; names starting with
'_' are private to it). An argument --key=value sets one key, the value parsed as a Python literal ('--compile=False',
'--n_layer=6', '--learning_rate=3e-4'); a key with a string default takes the text as it is. Every key must already
have a default, and a new value must have the default's type (an int is fine for a float; a None default takes
anything). Mistakes end the program with a one-line message naming the key. A tool that reads a training config for
some of its keys only (bench/bench_train.py) passes skip_unknown=True. --help (or -h) prints every key with its
value so far and the comment next to its default, grouped as in the source files that define them.
"""
import ast
import io
import sys
import tokenize
import types


def apply_overrides(argv, config, skip_unknown=False, sources=()):
    """Update the dict of defaults `config` from the arguments `argv` (e.g. sys.argv[1:]), in order. `sources`:
    the files that define the defaults, for --help."""
    for arg in argv:
        if arg in ('-h', '--help'):
            print(help_text(config, sources))
            sys.exit(0)
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


def help_text(config, sources):
    """Every key of config with its value, grouped and commented as in the files `sources` (module-level
    assignments under '# group' lines, or the fields of a dataclass, each with the comment on its line)."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else 'train.py'
    lines = [f'usage: python {script} [config/FILE.py ...] [--key=value ...]  (a file sets keys; later ones win)']
    described = set()
    for path in sources:
        for group, keys in _documented_keys(path):
            keys = [(key, comment) for key, comment in keys if key in config and key not in described]
            if not keys:
                continue
            lines.append(f'\n{group}:')
            for key, comment in keys:
                described.add(key)
                value = config[key] if isinstance(config[key], str) else repr(config[key])  # as typed
                setting = f'  --{key}={value}'
                lines.append(f'{setting:<40} {comment}'.rstrip() if comment else setting)
    rest = [key for key in config if key not in described]
    if rest:
        lines.append('\nother:')
        lines += [f'  --{key}={config[key]!r}' for key in rest]
    return '\n'.join(lines)


def _documented_keys(path):
    """[(group, [(key, comment)])] of a source file: its module-level assignments, grouped by the last full-line
    comment above them, and the fields of its dataclasses, grouped by class."""
    with open(path) as f:
        source = f.read()
    comments, headers = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            text = token.string.lstrip('#').strip()
            if token.line[:col].strip():
                comments[row] = text
            elif text and not set(text) <= {'-'}:
                headers[row] = text
    groups = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            header = max((row for row in headers if row < node.lineno), default=None)
            group = headers[header] if header is not None else path
            if not groups or groups[-1][0] != group:
                groups.append((group, []))
            groups[-1][1].append((node.targets[0].id, comments.get(node.lineno, '')))
        elif isinstance(node, ast.ClassDef):
            fields = [(item.target.id, comments.get(item.lineno, '')) for item in node.body
                      if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
            if fields:
                groups.append((f'model ({path.rsplit("/", 1)[-1]}, {node.name})', fields))
    return groups
