"""
Pack Tiny ImageNet (200 classes of 64x64 images) into uint8 numpy arrays, once.

Usage: python prepare_tin.py [--zip=FILE | --src=EXTRACTED_DIR]   # neither: downloads the zip into data/
       python prepare_tin.py --zip=tiny-imagenet-200.zip --classes=10 --out=data/tin10
Writes into --out (default data/tin): {train,val}_images.npy uint8 (N,64,64,3), {train,val}_labels.npy int16
(N,) in sorted(wnids) order, as an image-folder loader's, and meta.json. The unlabelled test/ is not used.
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
_read = None  # in each worker process: reads a name from the source, opened once (init_worker)

class PrepError(Exception):
    """Bad input or settings: reported as one line, without a traceback."""

def reader(path, is_zip):  # a zip is read in place, never extracted: its names cannot write anywhere
    return zipfile.ZipFile(path).read if is_zip else lambda name: pathlib.Path(path, name).read_bytes()

def file_md5(path):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

def download(url, path, md5, flags):
    if os.path.exists(path):
        if file_md5(path) == md5:
            return
        print(f'{path} has the wrong MD5, downloading it again')
    folder = os.path.dirname(path) or '.'
    made = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    part = f'{path}.part-{os.getpid()}'  # renamed into place only once complete and verified
    try:
        done, t0 = 0, time.time()
        with urllib.request.urlopen(url) as r, open(part, 'wb') as f:
            total = int(r.headers.get('Content-Length', 0))  # 0: the server did not say
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                rate = done / (time.time() - t0 + 1e-9)
                so_far = f'{done / total:.0%} of {total / 1e6:.0f} MB, ETA {(total - done) / rate:.0f} s' \
                    if total else f'{done / 1e6:.0f} MB'
                print(f'\rdownload: {so_far}, {rate / 1e6:.1f} MB/s  ', end='', flush=True)
        print()
        if (got := file_md5(part)) != md5:
            raise PrepError(f'{url}: downloaded MD5 {got} is not the expected {md5}')
        os.replace(part, path)
    except OSError as e:
        again = ''.join(f' {flag}' for flag in flags)
        raise PrepError(f'the download of {url} failed ({getattr(e, "reason", e)}): fetch that file '
                        f'another way, then run: python prepare_tin.py --zip=PATH{again} (or --src=DIR for '
                        f'an extracted copy)') from None
    finally:
        if os.path.exists(part):
            os.remove(part)
        if made and not os.listdir(folder):  # no empty data/ left behind
            os.rmdir(folder)

def init_worker(path, is_zip):
    global _read
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's own way to stop its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: the parent alone answers it
    _read = reader(path, is_zip)

def decode(name):
    try:
        img = Image.open(io.BytesIO(_read(name))).convert('RGB')  # grayscale/CMYK -> RGB
    except Exception as e:  # UnidentifiedImageError's own message names only the BytesIO
        why = 'not an image file Pillow knows' if isinstance(e, UnidentifiedImageError) else e
        raise PrepError(f'cannot read image {name}: {why}') from None
    if img.size != (SIZE, SIZE):
        raise PrepError(f'image {name} is {img.width}x{img.height}, expected {SIZE}x{SIZE}')
    return np.asarray(img)

def pack(pool, split, items, folder):
    names, labels = zip(*items)
    n = len(names)
    images = np.lib.format.open_memmap(  # memory-mapped, so the full train set never sits in RAM
        os.path.join(folder, f'{split}_images.npy'), mode='w+', dtype=np.uint8, shape=(n, SIZE, SIZE, 3))
    t0 = last = time.time()
    for done, img in enumerate(pool.imap(decode, names, chunksize=CHUNK), 1):
        images[done - 1] = img
        if (done % CHUNK == 0 and time.time() - last > 3) or done == n:  # results come CHUNK at a time
            last, dt = time.time(), time.time() - t0
            print(f'{split}: {done:,}/{n:,} images ({done / n:.0%}), {dt:.1f} s, '
                  f'ETA {dt / done * (n - done):.1f} s', flush=True)  # flush: seen through a pipe too
    images.flush()
    np.save(os.path.join(folder, f'{split}_labels.npy'), np.array(labels, np.int16))

def index(path, is_zip, k):
    if not os.path.exists(path):
        raise PrepError(f'{path}: no such file or folder')
    if is_zip:
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise PrepError(f'{path}: cannot open as a zip archive ({e})') from None
    elif os.path.isdir(path):
        names = [os.path.relpath(os.path.join(d, f), path).replace(os.sep, '/')  # as in a zip
                 for d, _, files in os.walk(path) for f in files]
    else:
        raise PrepError(f'{path}: not a folder')
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
    if k is not None and not 1 <= k <= len(wnids):
        raise PrepError(f'--classes={k} is out of range 1..{len(wnids)}')
    classes = wnids[:k]
    label = {w: i for i, w in enumerate(classes)}
    words = dict(l.split('\t', 1) for l in lines('words.txt') if '\t' in l)
    if missing := [w for w in classes if w not in words]:
        raise PrepError(f'{path}: {root}words.txt has no entry for {missing[0]}')
    by_class = {w: [] for w in classes}
    for n in names:
        p = n[len(root):].split('/')  # train/<wnid>/images/<file>; skips _boxes.txt, dirs
        if n.startswith(root + 'train/') and len(p) == 4 and p[1] in by_class and p[2] == 'images' and p[3]:
            by_class[p[1]].append(n)
    if empty := [w for w in classes if not by_class[w]]:
        raise PrepError(f'{path}: no train images in {root}train/{empty[0]}/images/')
    train = [(n, label[w]) for w in classes for n in sorted(by_class[w])]
    where = f'{path}: {root}val/val_annotations.txt: line'
    ann = [l.split('\t') for l in lines('val/val_annotations.txt')]  # file, wnid, box
    if bad := [i for i, a in enumerate(ann) if len(a) < 2]:
        raise PrepError(f'{where} {bad[0] + 1} (of the non-empty ones) is not "file<TAB>wnid<TAB>box"')
    if unknown := [i for i, a in enumerate(ann) if a[1] not in wnids]:
        raise PrepError(f'{where} {unknown[0] + 1} (of the non-empty ones) names {ann[unknown[0]][1]}, '
                        f'which wnids.txt does not list')
    val = sorted((a[0], label[a[1]]) for a in ann if a[1] in label)
    if not val:
        raise PrepError(f'{path}: {root}val/val_annotations.txt names no image of the packed classes')
    return classes, [words[w].strip() for w in classes], train, [(f'{root}val/images/{f}', y) for f, y in val]

def prepare(args):
    t0 = time.time()
    if args.workers < 1:
        raise PrepError(f'--workers={args.workers} must be at least 1')
    path, is_zip = args.src or args.zip or 'data/tiny-imagenet-200.zip', not args.src
    if not (args.src or args.zip):
        download(URL, path, MD5, args.flags)
    out = os.path.normpath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepError(f'--out={out} is a file, not a folder')
    if os.path.isdir(out) and (foreign := sorted(set(os.listdir(out)) - OUTPUTS)):  # it is replaced whole
        raise PrepError(f'--out={out} holds {foreign[0]}, which this script did not write: give a new folder '
                        f'(or an earlier output of this script, to replace it)')
    classes, names, train, val = index(path, is_zip, args.classes)
    tmp, old = f'{out}.tmp-{os.getpid()}', f'{out}.old-{os.getpid()}'  # tmp: renamed in only when complete
    try:
        os.makedirs(tmp)
        with mp.Pool(args.workers, initializer=init_worker, initargs=(path, is_zip)) as pool:
            pack(pool, 'train', train, tmp)
            pack(pool, 'val', val, tmp)
        meta = dict(classes=classes, names=names, num_train=len(train), num_val=len(val), source=path)
        pathlib.Path(tmp, 'meta.json').write_text(json.dumps(meta, indent=1))
        if os.path.exists(out):
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
    args.flags = sys.argv[1:] if argv is None else argv  # for the command the download's error gives
    try:
        prepare(args)
    except (PrepError, OSError) as e:
        print(f'prepare_tin.py: error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (see stop), after the clean-up of half-built output
        print(f'prepare_tin.py: stopped; nothing was written to {args.out}', file=sys.stderr)
        sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))

def stop(signum, frame):
    raise KeyboardInterrupt(signum)

if __name__ == '__main__':
    signal.signal(signal.SIGTERM, stop)  # SIGTERM (timeout, a scheduler) stops as Ctrl-C does
    main()
