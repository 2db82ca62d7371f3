# The reference's fine-tuning recipe (../shared/reference.md): 100 epochs, batch 128, blr 1e-3,
# weight decay 0.05, 5 warm-up epochs, AdamW (0.9, 0.999), random resized crop (0.08-1) + flip +
# RandAugment(2, 9) with bicubic resampling (finetune.py's default), cls token head. Its evaluation, a
# resize to 73 and the central 64 crop, is finetune.py's second view by default (eval_resize = 73).
# One difference from the reference's code, kept on purpose: its AdamW decays every parameter; ours,
# as the official MAE's, leaves biases, norms and the cls token undecayed (README.md, Settings).
out_dir = "out/ft_ref"
recipe = "ref"
pool = "cls"
epochs = 100
batch_size = 128
blr = 1e-3
weight_decay = 0.05
warmup_epochs = 5
beta1 = 0.9
beta2 = 0.999
crop_scale = (0.08, 1.0)
rand_augment_ops = 2
rand_augment_magnitude = 9
