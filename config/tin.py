# The report's protocol ("Replicating Masked Autoencoders ... on Tiny ImageNet", L. Burgund, 2026): MAE
# pre-training of ViT-Lite on Tiny ImageNet, 1200 epochs at batch 256, a checkpoint every 100 epochs, random
# resized crop (0.2-1) + flip, as its table and the official MAE say. Everything else is pretrain.py's
# default, which is the report's (model, mask 0.75, normalised-pixel target, blr 5e-4, weight decay 0.15 on
# the weight matrices and tokens, 20 warm-up epochs, AdamW (0.9, 0.95)). config/tin_ref.py is the same run as
# the reference's published code makes it.
data_dir = "data/tin"
out_dir = "out/tin"
epochs = 1200
save_every = 100
batch_size = 256
blr = 5e-4
weight_decay = 0.15
warmup_epochs = 20
