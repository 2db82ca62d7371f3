# Pre-training as the reference's code runs it at its last commit, 5423804 (Leob000/m2-MAE-reproduction):
# no random resized crop, only the flip (its use_rrc: false); the normalised-pixel target (norm_pix_loss:
# true); AdamW decaying every parameter, biases and norms included; and the protocol's 1200 epochs at
# batch 256, blr 5e-4, weight decay 0.15, 20 warm-up epochs, betas (0.9, 0.95).
out_dir = "out/tin_ref"
epochs = 1200
save_every = 100
batch_size = 256
blr = 5e-4
weight_decay = 0.15
warmup_epochs = 20
beta1 = 0.9
beta2 = 0.95
random_crop = False
norm_pix_loss = True
decay_all = True
