# A side experiment kept as the record of its figures, not part of the project. This code ran on
# 2026-11-27 on the 2-core CPU machine (PyTorch 2.13.0+cpu), from the repository root:
#     python results/cpu/probe114_crops2_approx.py
# It reads the H200 run's epoch-114 checkpoint from out/h200_114/ckpt_last.pt (not kept)
# and the packed data in data/tin. Output: probe114_crops2_approx.txt; it saves the features in
# out/rrc_full_features.pt for probe114_crops4_approx.py.
# An approximation, on all the data and on the CPU, of the
# linear probe as the reference's code trains it (random resized crops 0.08-1 + flip; probe.py --train_crop=True
# draws fresh crops every step, 50 per image, which would take about 21 h here). Here each training image gets
# K=2 crops (each with its own flip), drawn once; each head step picks one of an image's two at random.
# The epoch-114 normalised-loss encoder, cls token, bf16; both validation views; the protocol's head schedule.
import sys, time, torch
sys.argv = [sys.argv[0]]; sys.path.insert(0, ".")
import probe, data, runtime
probe.device, probe.dtype, probe.features = "cpu", "bfloat16", "cls"
K = 2
path = "out/h200_114/ckpt_last.pt"
tr_x, tr_y = data.load_split("data/tin", "train", "cpu")
va_x, va_y = data.load_split("data/tin", "val", "cpu")
enc = runtime.load_encoder(path, 64)[0].eval()
t0 = time.time()
torch.manual_seed(1)
crops = torch.empty(len(tr_x), K, 256)
for k in range(K):
    for i in range(0, len(tr_x), 500):
        u8 = tr_x[i:i + 500]
        with torch.no_grad():
            x = data.resized_crop_flip(data.to_float(u8), data.crop_flip_draws(len(u8), (0.08, 1.0)))
            crops[i:i + 500, k] = probe.encode(enc, x)
        if i % 10000 == 0:
            done = k * len(tr_x) + i + len(u8)
            print(f"crops {done:,}/{K * len(tr_x):,} at {time.time() - t0:.0f} s", flush=True)
val_f = {v: probe.extract_features(enc, va_x, resize_to=v) for v in (0, 73)}
t_feat = time.time() - t0
torch.save({"crops": crops, "val": val_f}, "out/rrc_full_features.pt")
last, best = {}, {0: 0.0, 73: 0.0}
def score(head):
    for v, f in val_f.items():
        last[v] = probe.top_k_accuracy(head(f), va_y)
        best[v] = max(best[v], last[v][0])
probe.train_head(lambda idx, flip: crops[idx, torch.randint(K, (len(idx),))], tr_y, 256, 200, score)
for v in (0, 73):
    print(f"view {v or 'plain'}: top-1 {last[v][0]:.2f}% (best epoch {best[v]:.2f}%) top-5 {last[v][1]:.2f}%")
print(f"features {t_feat:.0f} s, total {time.time() - t0:.0f} s")
