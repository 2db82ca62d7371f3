# A side experiment kept as the record of its figures, not part of the project. This code ran on
# 2026-11-27 on the 2-core CPU machine (PyTorch 2.13.0+cpu), from the repository root:
#     python results/cpu/probe114_crops4_approx.py
# It reads the H200 run's epoch-114 checkpoint from out/h200_114/ckpt_last.pt (not kept)
# and the packed data in data/tin. Output: probe114_crops4_approx.txt; it needs
# out/rrc_full_features.pt from probe114_crops2_approx.py.
# The all-data approximation of probe.py --train_crop=True
# (probe114_crops2_approx.py, K=2 crops per image drawn once: 25.55% in the reference's view) with K=4: the two crops
# of out/rrc_full_features.pt plus two new ones (seed 2). If more crops per image lift the head, fresh crops
# every step (the reference's and --train_crop=True's 50 per image) should do no worse than the stand-in.
# The epoch-114 normalised-loss encoder, cls token, bf16; both validation views; the protocol's head schedule.
import sys, time, torch
sys.argv = [sys.argv[0]]; sys.path.insert(0, ".")
import probe, data, runtime
probe.device, probe.dtype, probe.features = "cpu", "bfloat16", "cls"
old = torch.load("out/rrc_full_features.pt")
tr_x, tr_y = data.load_split("data/tin", "train", "cpu")
va_y = data.load_split("data/tin", "val", "cpu")[1]
enc = runtime.load_encoder("out/h200_114/ckpt_last.pt", 64)[0].eval()
t0 = time.time()
torch.manual_seed(2)
new = torch.empty(len(tr_x), 2, 256)
for k in range(2):
    for i in range(0, len(tr_x), 500):
        u8 = tr_x[i:i + 500]
        with torch.no_grad():
            x = data.resized_crop_flip(data.to_float(u8), data.crop_flip_draws(len(u8), (0.08, 1.0)))
            new[i:i + 500, k] = probe.encode(enc, x)
        if i % 10000 == 0:
            done = k * len(tr_x) + i + len(u8)
            print(f"crops {done:,}/{2 * len(tr_x):,} at {time.time() - t0:.0f} s", flush=True)
t_feat = time.time() - t0
crops, val_f = torch.cat([old["crops"], new], dim=1), old["val"]
torch.save({"crops": crops, "val": val_f}, "out/rrc_full4_features.pt")
for K in (2, 4):  # K=2 again, with this script's code, as the control
    last, best = {}, {0: 0.0, 73: 0.0}
    def score(head):
        for v, f in val_f.items():
            last[v] = probe.top_k_accuracy(head(f), va_y)
            best[v] = max(best[v], last[v][0])
    probe.train_head(lambda idx, flip: crops[idx, torch.randint(K, (len(idx),))], tr_y, 256, 200, score)
    for v in (0, 73):
        print(f"K={K} view {v or 'plain'}: top-1 {last[v][0]:.2f}% (best epoch {best[v]:.2f}%) top-5 {last[v][1]:.2f}%")
print(f"new crops {t_feat:.0f} s, total {time.time() - t0:.0f} s")
