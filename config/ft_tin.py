# Our fine-tuning recipe: the official MAE fine-tuning tools on the reference's budget.
# Where each value comes from:
#   epochs, batch, blr, warm-up, betas, crop, RandAugment(2, 9) with bicubic resampling: the reference
#   recipe (config/ft_ref.py)
#   global average pooling + LayerNorm head, layer-wise lr decay 0.75, drop path 0.1, mixup 0.8,
#   cutmix 1.0 (one draw per batch, timm's mode 'batch'), label smoothing 0.1, random erasing 0.25,
#   weight decay 0.05 (not on biases, norms and the cls token): the official MAE fine-tuning recipe
#   (its main_finetune.py)
# Not yet tuned for the 7-block model: no GPU sweep has been run (README.md, Results).
out_dir = "out/ft_tin"
recipe = "tin"
pool = "avg"
epochs = 100
batch_size = 128
blr = 1e-3
weight_decay = 0.05
warmup_epochs = 5
layer_decay = 0.75
drop_path = 0.1
mixup = 0.8
cutmix = 1.0
label_smoothing = 0.1
reprob = 0.25
