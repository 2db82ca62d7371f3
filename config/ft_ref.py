# Fine-tuning as the reference's code runs it at its last commit, 5423804 (Leob000/m2-MAE-reproduction):
# 100 epochs at batch 128, blr 1e-3, weight decay 0.05 on every parameter (biases and norms included),
# 5 warm-up epochs, AdamW (0.9, 0.999); random resized crop (0.08-1) + flip + RandAugment(2, 9) with bicubic
# resampling; no mixup, cutmix, label smoothing, erasing or drop path. Its classifier is the linear probe's:
# the cls token after the encoder's final LayerNorm, BatchNorm1d without affine parameters, then the Linear.
# Its evaluation, a resize to 73 and the central 64 crop, is finetune.py's second view (eval_resize = 73).
out_dir = "out/ft_ref"
recipe = "ref"
pool = "cls"
head = "batchnorm"
epochs = 100
batch_size = 128
blr = 1e-3
weight_decay = 0.05
decay_all = True
warmup_epochs = 5
beta1 = 0.9
beta2 = 0.999
crop_scale = (0.08, 1.0)
rand_augment_ops = 2
rand_augment_magnitude = 9
