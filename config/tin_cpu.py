# A few minutes on 2 CPU cores: a small ViT-Lite on the 10-class pack
# (python prepare_tin.py --classes=10 --out=data/tin10). It shows the loss falling and writes
# checkpoints and pictures like a real run; it is not meant to learn good features.
data_dir = "data/tin10"
out_dir = "out/tin_cpu"
device = "cpu"
dtype = "float32"
compile = False
embed_dim = 128
depth = 4
num_heads = 4
decoder_embed_dim = 64
decoder_depth = 1
decoder_num_heads = 4
batch_size = 64
epochs = 6
warmup_epochs = 1
blr = 1.5e-3
save_every = 3
log_interval = 10
