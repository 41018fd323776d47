"""data/prepare.py: the installed-source corpus (folders as documents, dedup, held-out packages, manifest) and
one-line errors for sources that hold nothing usable, with nothing left behind."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from data import prepare
from data.loader import load_tokenizer, read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def module(name, lines):
    """Distinct Python text for a module: its name in every line, so each file is unique."""
    return ''.join(f'def {name}_{i}(x):\n    return x + {i}\n' for i in range(lines))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A fake interpreter: a stdlib folder and a site-packages folder, with a vendored duplicate, an empty file,
    a non-UTF-8 file, a single-file module and metadata folders."""
    stdlib, site = tmp_path / 'lib', tmp_path / 'site'
    write(stdlib / 'abc.py', module('abc', 5))
    write(stdlib / 'os.py', module('os', 7))
    write(stdlib / 'email' / '__init__.py', '')
    write(stdlib / 'email' / 'parser.py', module('parser', 4))
    write(stdlib / 'email' / 'mime' / 'text.py', module('text', 3))
    write(stdlib / 'site-packages' / 'ignored.py', module('ignored', 2))  # some layouts nest site-packages here
    for i in range(6):
        write(site / f'pkg{i}' / 'core.py', module(f'core{i}', 20 + 10 * i))
        write(site / f'pkg{i}' / 'sub' / 'util.py', module(f'util{i}', 5))
    write(site / 'pkg5' / '_vendor' / 'copy.py', module('core0', 20))  # the same bytes as pkg0/core.py
    write(site / 'single.py', module('single', 6))
    (site / 'pkg4' / 'latin.py').write_bytes('caf\xe9 = 1\n'.encode('latin-1'))
    write(site / 'pkg0-1.0.dist-info' / 'fake.py', module('meta', 2))
    monkeypatch.setattr(prepare, 'site_roots', lambda: (str(stdlib), [str(site)]))
    return stdlib, site


def test_installed_source_is_grouped_by_folder_and_deduplicated(installed):
    packages, stats = prepare.installed_packages()
    assert sorted(packages) == ['pkg0', 'pkg1', 'pkg2', 'pkg3', 'pkg4', 'pkg5', 'single', 'stdlib', 'stdlib/email']
    folders = {p: [folder for folder, _, _ in docs] for p, docs in packages.items()}
    assert folders['stdlib/email'] == ['email', os.path.join('email', 'mime')]
    assert folders['pkg5'] == ['pkg5', os.path.join('pkg5', 'sub')]  # its vendored copy was the only file there
    (_, text, files), = packages['stdlib']
    assert files == 2 and text == f'# file: abc.py\n{module("abc", 5)}# file: os.py\n{module("os", 7)}'
    assert stats == {'files': 17, 'duplicates': 1, 'skipped': 1, 'empty': 1}
    assert not any('ignored' in t or 'meta_' in t for docs in packages.values() for _, t, _ in docs)


def test_installed_corpus_holds_out_whole_packages_with_a_manifest(installed, tmp_path):
    out = tmp_path / 'out'
    prepare.prepare(source='installed', out=str(out), vocab_size=300, val_fraction=0.2, test_fraction=0.1)
    assert sorted(os.listdir(out)) == ['manifest.json', 'test.bin', 'tokenizer.json', 'train.bin', 'val.bin']
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')], 'no staging folder left behind'
    manifest = json.load(open(out / 'manifest.json'))
    records = {r['package']: r for r in manifest['packages']}
    assert set(records) == {'pkg0', 'pkg1', 'pkg2', 'pkg3', 'pkg4', 'pkg5', 'single', 'stdlib', 'stdlib/email'}
    assert {r['split'] for r in records.values()} == {'train', 'val', 'test'}
    assert records['stdlib']['distribution'] == 'python' and records['pkg4']['files'] == 2
    tokenizer = load_tokenizer(str(out))
    for split in ('train', 'val', 'test'):
        tokens, offsets = read_shard(str(out / f'{split}.bin'))
        text = tokenizer.decode(np.asarray(tokens).tolist())
        mine = [p for p, r in records.items() if r['split'] == split]
        assert manifest['splits'][split]['tokens'] == len(tokens) == sum(records[p]['tokens'] for p in mine)
        assert manifest['splits'][split]['documents'] == len(offsets) - 1
        for package, record in records.items():  # a package's files are in its own split and nowhere else
            head = '# file: ' + ('email' if package == 'stdlib/email' else 'abc.py' if package == 'stdlib' else
                                 package)
            assert (head in text) == (record['split'] == split), (package, split)


def run_prepare(*args, env=None):
    """prepare.py as a user runs it, `python -m data.prepare` from the repository root: (exit code, stderr's last
    line, stderr)."""
    result = subprocess.run([sys.executable, '-m', 'data.prepare', *args], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=120, cwd=ROOT)
    return result.returncode, (result.stderr.strip().splitlines() or [''])[-1], result.stderr


def test_unusable_sources_fail_in_one_line_and_leave_nothing(tmp_path):
    empty, binary = tmp_path / 'empty', tmp_path / 'binary'
    empty.mkdir()
    binary.mkdir()
    for i in range(3):
        (binary / f'blob{i}.bin').write_bytes(bytes([0xff, 0xfe, 0x80 + i]) * 10)
    cases = [(str(tmp_path / 'missing'), 'no such file or folder'), (str(empty), 'holds no files'),
             (str(binary), 'every one of its 3 files was skipped as not UTF-8'),
             ('data/no_such_corpus', 'no such file or folder'),  # a relative path with a typo is not a hub name
             ('someone/some-dataset', 'HF_HUB_OFFLINE=1')]
    for source, message in cases:
        out = tmp_path / 'out'
        code, last, stderr = run_prepare(f'--source={source}', f'--out={out}', env={'HF_HUB_OFFLINE': '1'})
        assert code == 1 and last.startswith('error: ') and message in last and 'Traceback' not in stderr, stderr
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ['binary', 'empty'], source


def test_hub_without_network_fails_fast(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError('network unreachable')

    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(prepare.socket, 'create_connection', refuse)
    with pytest.raises(prepare.SourceError, match='cannot be reached'):
        prepare.hub_texts('someone/some-dataset', None, 'text', 10)


def test_held_out_packages_prefer_long_documents_and_respect_the_cap():
    long = math.ceil(prepare.LONG * prepare.CHARS_PER_TOKEN)
    packages = {f'p{i:02d}': [('f', 'x' * 100_000, 1)] * 3 for i in range(40)}
    packages['dense'] = [('f', 'x' * long, 1)]                          # one long document
    packages['huge'] = [('f', 'x' * long, 1)] + [('g', 'x' * 100_000, 1)] * 20  # over 5% of the corpus
    split = prepare.hold_out(packages, seed=0, val_fraction=0.02, test_fraction=0.02, min_long_docs=1)
    assert split['dense'] == 'val' and split['huge'] == 'train'
    # 2% is 291k characters: dense (275k) and one more package for val, one package for test
    assert list(split.values()).count('val') == 2 and list(split.values()).count('test') == 1
    with pytest.raises(prepare.SourceError, match='at least 3'):
        prepare.hold_out({'a': packages['p00'], 'b': packages['p01']}, 0, 0.1, 0.1, 0)
