"""
Tests for prepare_tin.py on a small generated archive in the official Tiny ImageNet
layout, plus checks on the real archive where one is at hand: the file TIN_ZIP names
(by default data/tiny-imagenet-200.zip, where prepare_tin.py downloads it).
Run: python -m pytest test_prepare.py -q   (or python test_prepare.py)
"""
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_tin

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / 'prepare_tin.py'
REAL_ZIP = Path(os.environ.get('TIN_ZIP', HERE / 'data' / 'tiny-imagenet-200.zip')).resolve()
R = 'tiny-imagenet-200/'
WNIDS = ['n01000003', 'n01000001', 'n01000002']  # unsorted on purpose: labels follow sorted ids
CLASSES = sorted(WNIDS)
WORDS = {'n00000009': 'unrelated', 'n01000001': 'aardvark', 'n01000002': 'badger, brock',
         'n01000003': 'cat', 'n09999999': 'also unrelated'}
VAL = ['n01000002', 'n01000003', 'n01000001', 'n01000003', 'n01000001']  # wnid of val_<k>
GRAY = f'{R}train/n01000002/images/n01000002_1.JPEG'
CMYK = f'{R}train/n01000003/images/n01000003_2.JPEG'

def jpeg(rng, mode='RGB', size=64):
    bands = len(mode)  # 'L' 1, 'RGB' 3, 'CMYK' 4
    buf = io.BytesIO()
    Image.frombytes(mode, (size, size), rng.integers(0, 256, (size, size, bands), dtype=np.uint8).tobytes()
                    ).save(buf, 'JPEG', quality=90)
    return buf.getvalue()

def make_members():
    rng = np.random.default_rng(0)
    m = {R + 'wnids.txt': '\n'.join(WNIDS) + '\n',
         R + 'words.txt': ''.join(f'{w}\t{n}\n' for w, n in WORDS.items())}
    for w in WNIDS:
        m[f'{R}train/{w}/{w}_boxes.txt'] = ''.join(f'{w}_{k}.JPEG\t0\t0\t63\t63\n' for k in range(4))
        for k in range(4):
            name = f'{R}train/{w}/images/{w}_{k}.JPEG'
            m[name] = jpeg(rng, {GRAY: 'L', CMYK: 'CMYK'}.get(name, 'RGB'))
    for k, w in enumerate(VAL):
        m[f'{R}val/images/val_{k}.JPEG'] = jpeg(rng)
    m[R + 'val/val_annotations.txt'] = ''.join(  # reversed: val order must come from sorting
        f'val_{k}.JPEG\t{w}\t0\t0\t63\t63\n' for k, w in reversed(list(enumerate(VAL))))
    m[R + 'test/images/test_0.JPEG'] = jpeg(rng)  # unlabeled split: must be ignored
    return m

def write_zip(path, members):
    names = list(members)
    random.Random(0).shuffle(names)  # archive order must not matter
    with zipfile.ZipFile(path, 'w') as zf:
        for n in names:
            zf.writestr(n, members[n])
    return path

def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))

@pytest.fixture(scope='module')
def members():
    return make_members()

@pytest.fixture
def archive(tmp_path, members):
    return write_zip(tmp_path / 'archive.zip', members)

def load(out):
    out = Path(out)
    arrays = {k: np.load(out / f'{k}.npy') for k in ('train_images', 'train_labels', 'val_images', 'val_labels')}
    return arrays, json.loads((out / 'meta.json').read_text())

def leftovers(out):
    return sorted(p.name for p in Path(out).parent.iterdir() if p.name.startswith(Path(out).name))

# -----------------------------------------------------------------------------

def test_pack_zip(tmp_path, archive, members):
    out = tmp_path / 'tin'
    prepare_tin.main([f'--zip={archive}', f'--out={out}', '--workers=2'])
    a, meta = load(out)
    train = [f'{R}train/{w}/images/{w}_{k}.JPEG' for w in CLASSES for k in range(4)]
    val = [f'{R}val/images/val_{k}.JPEG' for k in range(5)]
    assert a['train_images'].shape == (12, 64, 64, 3) and a['train_images'].dtype == np.uint8
    assert a['val_images'].shape == (5, 64, 64, 3) and a['val_images'].dtype == np.uint8
    assert a['train_labels'].dtype == np.int16 and a['val_labels'].dtype == np.int16
    assert a['train_labels'].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert a['val_labels'].tolist() == [CLASSES.index(w) for w in VAL] == [1, 2, 0, 2, 0]
    for i, name in enumerate(train):
        np.testing.assert_array_equal(a['train_images'][i], decode(members[name]), err_msg=name)
    for i, name in enumerate(val):
        np.testing.assert_array_equal(a['val_images'][i], decode(members[name]), err_msg=name)
    assert Image.open(io.BytesIO(members[GRAY])).mode == 'L' and Image.open(io.BytesIO(members[CMYK])).mode == 'CMYK'
    g = a['train_images'][train.index(GRAY)]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all() and g.std() > 10
    assert meta == dict(classes=CLASSES, names=['aardvark', 'badger, brock', 'cat'],
                        num_train=12, num_val=5, source=str(archive))
    assert leftovers(out) == ['tin']

def test_classes_subset(tmp_path, archive):
    out = tmp_path / 'tin2'
    prepare_tin.main([f'--zip={archive}', f'--out={out}', '--classes=2'])
    a, meta = load(out)
    full_out = tmp_path / 'full'
    prepare_tin.main([f'--zip={archive}', f'--out={full_out}'])
    full, _ = load(full_out)
    assert meta['classes'] == CLASSES[:2] and meta['num_train'] == 8 and meta['num_val'] == 3
    assert a['train_labels'].tolist() == [0] * 4 + [1] * 4
    assert a['val_labels'].tolist() == [1, 0, 0]  # val_1 (class 2) dropped
    np.testing.assert_array_equal(a['train_images'], full['train_images'][:8])
    np.testing.assert_array_equal(a['val_images'], full['val_images'][[0, 2, 4]])

def test_src_folder_matches_zip(tmp_path, archive, members):
    for name, data in members.items():
        p = tmp_path / 'extracted' / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    prepare_tin.main([f'--zip={archive}', f'--out={tmp_path / "z"}'])
    ref, _ = load(tmp_path / 'z')
    for src in (tmp_path / 'extracted' / 'tiny-imagenet-200', tmp_path / 'extracted'):  # root or parent
        prepare_tin.main([f'--src={src}', f'--out={tmp_path / "s"}'])
        a, meta = load(tmp_path / 's')
        assert meta['source'] == str(src)
        for k in ref:
            np.testing.assert_array_equal(a[k], ref[k], err_msg=k)
            assert a[k].dtype == ref[k].dtype

def test_replaces_existing_output(tmp_path, archive):
    out = tmp_path / 'tin'
    prepare_tin.main([f'--zip={archive}', f'--out={out}', '--classes=1'])
    prepare_tin.main([f'--zip={archive}', f'--out={out}'])
    a, meta = load(out)
    assert meta['num_train'] == 12 and len(a['train_images']) == 12
    assert sorted(p.name for p in out.iterdir()) == sorted(prepare_tin.OUTPUTS)
    assert leftovers(out) == ['tin']

def test_a_failure_between_the_two_renames_puts_the_earlier_output_back(tmp_path, archive, monkeypatch, capsys):
    out = tmp_path / 'tin'
    prepare_tin.main([f'--zip={archive}', f'--out={out}', '--classes=1'])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename, calls = os.rename, []

    def second_rename_fails(src, dst):  # the earlier output is moved aside, then the new one cannot move in
        calls.append(src)
        if len(calls) == 2:
            raise OSError('disk full')
        rename(src, dst)
    monkeypatch.setattr(prepare_tin.os, 'rename', second_rename_fails)
    with pytest.raises(SystemExit):  # main reports the OSError as one line
        prepare_tin.main([f'--zip={archive}', f'--out={out}'])
    assert 'disk full' in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(out) == ['tin']


@pytest.mark.parametrize('case', ['earlier output and a note', 'the archive itself'])
def test_never_replaces_a_folder_holding_other_files(tmp_path, archive, case):
    out = tmp_path / 'data'
    if case == 'earlier output and a note':
        prepare_tin.main([f'--zip={archive}', f'--out={out}', '--classes=1'])
        source, stranger = archive, out / 'notes.txt'
        stranger.write_text('mine')
    else:  # python prepare_tin.py --out=data, next to the downloaded data/tiny-imagenet-200.zip
        out.mkdir()
        source = stranger = Path(shutil.copy(archive, out / 'tiny-imagenet-200.zip'))
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run([sys.executable, str(SCRIPT), f'--zip={source}', f'--out={out}'],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1 and f'--out={out} holds {stranger.name}' in lines[0], r.stderr
    assert sorted(p.name for p in out.iterdir()) == before and leftovers(out) == ['data']

def test_download(tmp_path, archive, monkeypatch, capsys):
    # a file:// URL stands in for the official one, so this runs offline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_tin, 'URL', archive.as_uri())
    monkeypatch.setattr(prepare_tin, 'MD5', '0' * 32)
    with pytest.raises(SystemExit) as e:
        prepare_tin.main([])
    assert e.value.code == 1 and 'MD5' in capsys.readouterr().err
    assert not (tmp_path / 'data').exists() or list((tmp_path / 'data').iterdir()) == []
    monkeypatch.setattr(prepare_tin, 'MD5', hashlib.md5(archive.read_bytes()).hexdigest())
    prepare_tin.main([])
    assert 'download: 100%' in capsys.readouterr().out
    assert (tmp_path / 'data' / 'tiny-imagenet-200.zip').read_bytes() == archive.read_bytes()
    assert load(tmp_path / 'data' / 'tin')[1]['source'] == 'data/tiny-imagenet-200.zip'
    monkeypatch.setattr(prepare_tin, 'URL', 'file:///nonexistent')  # present and verified: no download
    prepare_tin.main(['--out=data/again'])
    assert 'download' not in capsys.readouterr().out and (tmp_path / 'data' / 'again').is_dir()

def test_a_failed_download_says_what_to_do_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    # no network (here: a URL that cannot be fetched): one line naming it, and the two ways to go on
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_tin, 'URL', (tmp_path / 'nowhere' / 'tiny-imagenet-200.zip').as_uri())
    with pytest.raises(SystemExit) as e:
        prepare_tin.main(['--classes=3', '--out=data/tin3'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(lines) == 1, lines
    assert f'the download of {prepare_tin.URL} failed' in lines[0] and '--src=DIR' in lines[0]
    assert 'then run: python prepare_tin.py --zip=PATH --classes=3 --out=data/tin3 (' in lines[0]  # its own flags
    assert list(tmp_path.iterdir()) == []  # no data/ folder, no partial archive

# -----------------------------------------------------------------------------
# errors: one line on stderr, status 1, nothing left behind

BAD = f'{R}train/n01000001/images/n01000001_2.JPEG'
SMALL = f'{R}val/images/val_3.JPEG'

def make_error_case(case, tmp_path, members):
    """Returns (argv, text the error line must contain)."""
    z = tmp_path / 'bad.zip'
    if case == 'missing zip':
        return [f'--zip={z}'], str(z)
    if case == 'missing folder':
        return [f'--src={tmp_path / "nope"}'], 'nope'
    if case == 'truncated zip':
        data = write_zip(tmp_path / 'ok.zip', members).read_bytes()
        z.write_bytes(data[:len(data) // 2])
        return [f'--zip={z}'], str(z)
    if case == 'not a zip':
        z.write_text('hello, not an archive\n' * 100)
        return [f'--zip={z}'], str(z)
    if case == 'foreign zip':
        write_zip(z, {'readme.txt': 'hi', 'pics/a.JPEG': members[GRAY]})
        return [f'--zip={z}'], 'wnids.txt'
    if case.startswith('missing ') and case.endswith('.txt'):
        name = R + ('val/' if 'val' in case else '') + case.split()[1]
        write_zip(z, {k: v for k, v in members.items() if k != name})
        return [f'--zip={z}'], case.split()[1] if 'wnids' in case else name  # no wnids.txt: no root
    data = {'corrupt jpeg': (BAD, os.urandom(3000)),
            'truncated jpeg': (BAD, members[BAD][:len(members[BAD]) // 2]),
            'small image': (SMALL, jpeg(np.random.default_rng(1), size=32))}
    if case in data:
        name, content = data[case]
        write_zip(z, {**members, name: content})
        return [f'--zip={z}', '--workers=2'], name  # raised in a worker, reported by the parent
    if case == 'val annotations not tab-separated':
        name = R + 'val/val_annotations.txt'
        write_zip(z, {**members, name: members[name].replace('\t', ' ')})
        return [f'--zip={z}'], 'val_annotations.txt: line 1'
    if case == 'val annotation of an unknown class':
        name = R + 'val/val_annotations.txt'
        write_zip(z, {**members, name: members[name] + 'val_0.JPEG\tn09999999\t0\t0\t63\t63\n'})
        return [f'--zip={z}'], 'names n09999999, which wnids.txt does not list'
    write_zip(z, members)
    if case == 'out is a file':
        return [f'--zip={z}'], '--out='
    return [f'--zip={z}', f'--classes={case.split("=")[1]}'], '--classes'

ERRORS = ['missing zip', 'missing folder', 'truncated zip', 'not a zip', 'foreign zip',
          'missing wnids.txt', 'missing words.txt', 'missing val_annotations.txt',
          'val annotations not tab-separated', 'val annotation of an unknown class', 'corrupt jpeg', 'truncated jpeg', 'small image', 'classes=0',
          'classes=4', 'out is a file']

@pytest.mark.parametrize('case', ERRORS)
def test_errors(case, tmp_path, members):
    argv, needle = make_error_case(case, tmp_path, members)
    out = tmp_path / 'out'
    if case == 'out is a file':
        out.write_text('not a folder')
    r = subprocess.run([sys.executable, str(SCRIPT), *argv, f'--out={out}'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare_tin.py: error: '), r.stderr
    assert needle in lines[0]
    if case == 'small image':
        assert '32x32' in lines[0]
    assert leftovers(out) == ([] if case != 'out is a file' else ['out']) and not out.is_dir()

@pytest.mark.skipif(not REAL_ZIP.exists(), reason='no real Tiny ImageNet zip: set TIN_ZIP')
def test_sigterm_leaves_nothing_half_built(tmp_path):
    out = tmp_path / 'tin'
    p = subprocess.Popen([sys.executable, str(SCRIPT), f'--zip={REAL_ZIP}', f'--out={out}', '--workers=1'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith('train: ')  # packing has begun, into a temporary folder
    assert leftovers(out) == [f'tin.tmp-{p.pid}']
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM, p.stderr.read()
    assert leftovers(out) == []

@pytest.mark.skipif(not REAL_ZIP.exists(), reason='no real Tiny ImageNet zip: set TIN_ZIP')
def test_ctrl_c_is_one_line_and_leaves_nothing_half_built(tmp_path):
    # a terminal's Ctrl-C reaches the whole process group, the decoding workers too: they keep quiet
    out = tmp_path / 'tin'
    p = subprocess.Popen([sys.executable, str(SCRIPT), f'--zip={REAL_ZIP}', f'--out={out}', '--workers=2'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline().startswith('train: ')
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(timeout=60) == 128 + signal.SIGINT
    errors = p.stderr.read()
    assert errors.strip().splitlines() == [f'prepare_tin.py: stopped; nothing was written to {out}'], errors
    assert leftovers(out) == []

# -----------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_ZIP.exists(), reason='no real Tiny ImageNet zip: set TIN_ZIP')
def test_real_archive(tmp_path):
    out = tmp_path / 'tin2'
    prepare_tin.main([f'--zip={REAL_ZIP}', f'--out={out}', '--classes=2'])
    a, meta = load(out)
    assert a['train_images'].shape == (1000, 64, 64, 3) and a['train_images'].dtype == np.uint8
    assert a['val_images'].shape == (100, 64, 64, 3) and a['val_images'].dtype == np.uint8
    assert np.bincount(a['train_labels']).tolist() == [500, 500]
    assert np.bincount(a['val_labels']).tolist() == [50, 50]
    assert meta['classes'] == ['n01443537', 'n01629819'] and meta['names'][0].startswith('goldfish')
    with zipfile.ZipFile(REAL_ZIP) as zf:  # sorted by file name: _0, _1, _10, _100, ... so index 3 is _100
        np.testing.assert_array_equal(a['train_images'][3],
                                      decode(zf.read(f'{R}train/n01443537/images/n01443537_100.JPEG')))
        ann = [l.split('\t') for l in zf.read(f'{R}val/val_annotations.txt').decode().splitlines()]
        first = min(f for f, w, *_ in ann if w in meta['classes'])
        np.testing.assert_array_equal(a['val_images'][0], decode(zf.read(f'{R}val/images/{first}')))

if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
