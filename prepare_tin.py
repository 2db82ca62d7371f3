"""
Pack Tiny ImageNet (200 classes of 64x64 images) into uint8 numpy arrays, once.

Usage:
    python prepare_tin.py                          # downloads the official zip, packs into data/tin
    python prepare_tin.py --zip=../shared/data/tiny-imagenet-200.zip
    python prepare_tin.py --src=path/to/tiny-imagenet-200   # an extracted folder
    python prepare_tin.py --zip=... --classes=10 --out=data/tin10

Writes into --out: train_images.npy uint8 (N,64,64,3), train_labels.npy int16 (N,),
val_images.npy uint8 (M,64,64,3), val_labels.npy int16 (M,) and meta.json
(classes, names, num_train, num_val, source). Labels follow sorted(wnids), the order
an image-folder loader gives. The archive's test/ split has no labels and is not used.
"""
import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import pathlib
import shutil
import signal
import sys
import time
import urllib.request
import zipfile

import numpy as np
from PIL import Image, UnidentifiedImageError

URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
MD5 = '90528d7ca1a48142e341f4ef8d21d0de'
SIZE = 64
CHUNK = 500  # images per worker task: amortizes the IPC, still gives smooth progress
OUTPUTS = {'train_images.npy', 'train_labels.npy', 'val_images.npy', 'val_labels.npy', 'meta.json'}


class PrepError(Exception):
    """Bad input or settings: reported as one line, without a traceback."""

# -----------------------------------------------------------------------------
# the source: a zip read in place (never extracted, so member names cannot write
# anywhere) or an extracted folder. Names are '/'-separated paths relative to it.

def reader(path, is_zip):
    if is_zip:
        return zipfile.ZipFile(path).read
    return lambda name: pathlib.Path(path, name).read_bytes()

def list_names(path, is_zip):
    if not os.path.exists(path):
        raise PrepError(f'{path}: no such file or folder')
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                return zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise PrepError(f'{path}: cannot open as a zip archive ({e})') from None
    if not os.path.isdir(path):
        raise PrepError(f'{path}: not a folder')
    return [os.path.relpath(os.path.join(d, f), path).replace(os.sep, '/')
            for d, _, files in os.walk(path) for f in files]

def download(url, path, md5):
    if os.path.exists(path):
        if file_md5(path) == md5:
            return
        print(f'{path} has the wrong MD5, downloading it again')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    part = f'{path}.part-{os.getpid()}'  # renamed into place only once complete and verified
    try:
        h, done, t0 = hashlib.md5(), 0, time.time()
        with urllib.request.urlopen(url) as r, open(part, 'wb') as f:
            total = int(r.headers.get('Content-Length', 0))  # 0: the server did not say
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                rate = done / (time.time() - t0 + 1e-9)
                so_far = f'{done / total:.0%} of {total / 1e6:.0f} MB, ETA {(total - done) / rate:.0f} s' \
                    if total else f'{done / 1e6:.0f} MB'
                print(f'\rdownload: {so_far}, {rate / 1e6:.1f} MB/s  ', end='', flush=True)
        print()
        if h.hexdigest() != md5:
            raise PrepError(f'{url}: downloaded MD5 {h.hexdigest()} is not the expected {md5}')
        os.replace(part, path)
    except OSError as e:
        raise PrepError(f'cannot download {url}: {e}') from None
    finally:
        if os.path.exists(part):
            os.remove(part)

def file_md5(path):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

# -----------------------------------------------------------------------------
# decoding, in worker processes that each open the source once

_read = None

def init_worker(path, is_zip):
    global _read
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's own way to stop its workers
    _read = reader(path, is_zip)

def decode(names):
    out = np.empty((len(names), SIZE, SIZE, 3), np.uint8)
    for i, name in enumerate(names):
        try:
            img = Image.open(io.BytesIO(_read(name))).convert('RGB')  # grayscale/CMYK -> RGB
        except UnidentifiedImageError:  # its own message names only the BytesIO
            raise PrepError(f'cannot read image {name}: not an image file Pillow knows') from None
        except Exception as e:
            raise PrepError(f'cannot read image {name}: {e}') from None
        if img.size != (SIZE, SIZE):
            raise PrepError(f'image {name} is {img.width}x{img.height}, expected {SIZE}x{SIZE}')
        out[i] = np.asarray(img)
    return out

def pack(pool, split, items, folder):
    names, labels = [n for n, _ in items], [y for _, y in items]
    # write straight into a memory-mapped .npy so the full train set never sits in RAM
    images = np.lib.format.open_memmap(os.path.join(folder, f'{split}_images.npy'), mode='w+',
                                       dtype=np.uint8, shape=(len(names), SIZE, SIZE, 3))
    chunks = [names[i:i + CHUNK] for i in range(0, len(names), CHUNK)]
    done = 0
    t0 = last = time.time()
    for chunk in pool.imap(decode, chunks):
        images[done:done + len(chunk)] = chunk
        done += len(chunk)
        if time.time() - last > 3 or done == len(names):
            last, dt = time.time(), time.time() - t0
            print(f'{split}: {done:,}/{len(names):,} images ({done / len(names):.0%}), '
                  f'{dt:.1f} s, ETA {dt / done * (len(names) - done):.1f} s', flush=True)  # seen through a pipe too
    images.flush()
    del images
    np.save(os.path.join(folder, f'{split}_labels.npy'), np.array(labels, np.int16))

# -----------------------------------------------------------------------------

def index(path, is_zip, k):
    """Find the first k classes (by sorted wnid), their names, and the train/val images."""
    names = list_names(path, is_zip)
    # the dataset root is the folder holding wnids.txt; copies differ in what wraps it
    roots = sorted((n[:-len('wnids.txt')] for n in names if n.split('/')[-1] == 'wnids.txt'), key=len)
    if not roots:
        raise PrepError(f'{path}: no wnids.txt inside, not a Tiny ImageNet archive or folder')
    root, name_set, read = roots[0], set(names), reader(path, is_zip)

    def lines(name):
        if root + name not in name_set:
            raise PrepError(f'{path}: missing {root + name}')
        return [l for l in read(root + name).decode().splitlines() if l.strip()]

    wnids = sorted(l.strip() for l in lines('wnids.txt'))
    k = len(wnids) if k is None else k
    if not 1 <= k <= len(wnids):
        raise PrepError(f'--classes={k} is out of range 1..{len(wnids)}')
    classes = wnids[:k]
    label = {w: i for i, w in enumerate(classes)}
    words = dict(l.split('\t', 1) for l in lines('words.txt') if '\t' in l)
    missing = [w for w in classes if w not in words]
    if missing:
        raise PrepError(f'{path}: {root}words.txt has no entry for {missing[0]}')

    by_class = {w: [] for w in classes}
    for n in names:
        parts = n[len(root):].split('/')  # train/<wnid>/images/<file>; skips _boxes.txt, dirs
        if n.startswith(root) and len(parts) == 4 and parts[0] == 'train' and parts[2] == 'images' \
                and parts[1] in by_class and parts[3]:
            by_class[parts[1]].append(n)
    empty = [w for w in classes if not by_class[w]]
    if empty:
        raise PrepError(f'{path}: no train images in {root}train/{empty[0]}/images/')
    train = [(n, label[w]) for w in classes for n in sorted(by_class[w])]
    ann = [l.split('\t') for l in lines('val/val_annotations.txt')]  # file, wnid, box
    bad = [i for i, a in enumerate(ann) if len(a) < 2]
    if bad:
        raise PrepError(f'{path}: {root}val/val_annotations.txt: line {bad[0] + 1} (of the non-empty ones) is not '
                        f'"file<TAB>wnid<TAB>box"')
    unknown = [i for i, a in enumerate(ann) if a[1] not in wnids]
    if unknown:
        raise PrepError(f'{path}: {root}val/val_annotations.txt: line {unknown[0] + 1} (of the non-empty ones) '
                        f'names {ann[unknown[0]][1]}, which wnids.txt does not list')
    val = [(f'{root}val/images/{f}', y) for f, y in sorted((a[0], label[a[1]]) for a in ann if a[1] in label)]
    if not val:
        raise PrepError(f'{path}: {root}val/val_annotations.txt names no image of the packed classes')
    return classes, [words[w].strip() for w in classes], train, val

def prepare(args):
    t0 = time.time()
    if args.workers < 1:
        raise PrepError(f'--workers={args.workers} must be at least 1')
    if args.src:
        path, is_zip = args.src, False
    else:
        path, is_zip = args.zip or 'data/tiny-imagenet-200.zip', True
        if not args.zip:
            download(URL, path, MD5)
    out = os.path.normpath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepError(f'--out={out} is a file, not a folder')
    # the new output replaces --out whole, so --out may hold nothing but an earlier output
    foreign = sorted(set(os.listdir(out)) - OUTPUTS) if os.path.isdir(out) else []
    if foreign:
        raise PrepError(f'--out={out} holds {foreign[0]}, which this script did not write: give a new folder '
                        f'(or an earlier output of this script, to replace it)')
    classes, names, train, val = index(path, is_zip, args.classes)

    tmp = f'{out}.tmp-{os.getpid()}'  # built aside, renamed in only when complete
    try:
        os.makedirs(tmp)
        with mp.Pool(args.workers, initializer=init_worker, initargs=(path, is_zip)) as pool:
            pack(pool, 'train', train, tmp)
            pack(pool, 'val', val, tmp)
        meta = dict(classes=classes, names=names, num_train=len(train), num_val=len(val), source=path)
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(out):
            old = f'{out}.old-{os.getpid()}'
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:  # SIGTERM or a failure between the two renames: the earlier output returns
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    for f, s in sizes.items():
        print(f'  {os.path.join(out, f)}: {s:,} bytes')
    print(f'packed {len(train):,} train + {len(val):,} val images of {len(classes)} classes '
          f'from {path} into {out} ({sum(sizes.values()) / 1e9:.2f} GB) in {time.time() - t0:.1f} s')

def main(argv=None):
    p = argparse.ArgumentParser(prog='prepare_tin.py', description=__doc__.split('\n\n')[0].strip())
    src = p.add_mutually_exclusive_group()
    src.add_argument('--zip', help='local tiny-imagenet-200.zip (default: download the official one)')
    src.add_argument('--src', help='extracted folder: the one holding wnids.txt, or its parent')
    p.add_argument('--classes', type=int, help='pack only the first K classes by sorted id')
    p.add_argument('--out', default='data/tin', help='output folder (default: data/tin)')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='decoding processes')
    args = p.parse_args(argv)
    try:
        prepare(args)
    except (PrepError, OSError) as e:
        print(f'prepare_tin.py: error: {e}', file=sys.stderr)
        sys.exit(1)

if __name__ == '__main__':
    # SIGTERM (timeout, a scheduler) stops as Ctrl-C does: through the clean-up of half-built output
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
