# The reference protocol (../shared/reference.md): MAE pre-training of ViT-Lite on Tiny ImageNet,
# 1200 epochs at batch 256, checkpoints every 100 epochs. Everything else is pretrain.py's default,
# which already is the reference's (model, mask 0.75, normalised pixel loss, crop scale 0.2-1).
data_dir = "data/tin"
out_dir = "out/tin"
epochs = 1200
save_every = 100
batch_size = 256
blr = 5e-4
weight_decay = 0.15
warmup_epochs = 20
