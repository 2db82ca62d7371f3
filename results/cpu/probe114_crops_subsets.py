# A side experiment kept as the record of its figures, not part of the project. This code ran on
# 2026-11-27 on the 2-core CPU machine (PyTorch 2.13.0+cpu), from the repository root:
#     python results/cpu/probe114_crops_subsets.py
# It reads the H200 run's epoch-114 checkpoint from out/h200_114/ckpt_last.pt (not kept)
# and the packed data in data/tin.
# The reference's train_classifier.py never passes
# use_rrc=False, so its linear probe trains on RandomResizedCrop(64, scale 0.08-1, bicubic) + flip, not on
# flip alone as its config (and reference.md) says. Does a head trained on such crops lose less to the
# reference's view (resize 73, central crop)? Subsets: 100 training images per class,
# 25 validation images per class; the epoch-114 normalised-loss encoder, cls token, bf16 on the CPU.
# K crops per training image are computed once; each head step picks one of an image's K at random.
import sys, time, torch
sys.argv = [sys.argv[0]]; sys.path.insert(0, ".")
import probe, data, runtime
probe.device, probe.dtype, probe.features = "cpu", "bfloat16", "cls"
K = int(sys.argv[1]) if len(sys.argv) > 1 else 4
path = sys.argv[2] if len(sys.argv) > 2 else "out/h200_114/ckpt_last.pt"
tr_x, tr_y = data.load_split("data/tin", "train", "cpu")
va_x, va_y = data.load_split("data/tin", "val", "cpu")
def per_class(y, k):
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:k]] for c in range(200)])
ti, vi = per_class(tr_y, 100), per_class(va_y, 25)
enc = runtime.load_encoder(path, 64)[0].eval()
t0 = time.time()
plain = probe.extract_features(enc, tr_x[ti])
val_f = {v: probe.extract_features(enc, va_x[vi], resize_to=v) for v in (0, 73)}
torch.manual_seed(1)
crops = []
for k in range(K):
    out = []
    for i in range(0, len(ti), 500):
        u8 = tr_x[ti[i:i + 500]]
        with torch.no_grad():
            x = data.resized_crop_flip(data.to_float(u8), data.crop_flip_draws(len(u8), (0.08, 1.0)))
            with runtime.autocast("cpu", "bfloat16"):
                out.append(enc(data.normalize(x)).float()[:, 0].clone())
    crops.append(torch.cat(out))
    print(f"crop set {k + 1}/{K} done at {time.time() - t0:.0f} s", flush=True)
crops = torch.stack(crops, dim=1)  # (N, K, D)
print(f"features in {time.time() - t0:.0f} s", flush=True)
def report(name, features_of):
    head = probe.train_head(features_of, tr_y[ti], 256, 200)
    with torch.no_grad():
        acc = {v: probe.top_k_accuracy(head(val_f[v]), va_y[vi])[0] for v in (0, 73)}
    print(f"  {name:28s} linear top-1: plain {acc[0]:5.2f}%  reference's view {acc[73]:5.2f}%  "
          f"cost {acc[0] - acc[73]:5.2f}", flush=True)
report("plain (unflipped)", lambda idx, flip: plain[idx])
report(f"random resized crops (K={K})", lambda idx, flip: crops[idx, torch.randint(K, (len(idx),))])
report("crops + plain mixed", lambda idx, flip: torch.where(flip[:, None], plain[idx], crops[idx, torch.randint(K, (len(idx),))]))
