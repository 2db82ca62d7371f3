"""
ViT-Lite and the Masked Autoencoder (He et al., 2021) for 64x64 images in plain PyTorch, after the official
models_mae.py: patchify, random_masking (argsort of noise; mask 0 = keep, 1 = remove), forward_encoder,
forward_decoder, forward_loss. The fine-tuning classifier shares the encoder, so a pre-training checkpoint's
`encoder.*` weights load into it.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

@dataclass
class ViTConfig:
    img_size: int = 64
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 256
    depth: int = 7
    num_heads: int = 4
    mlp_ratio: float = 2.0
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

# -----------------------------------------------------------------------------
# patches and position embeddings

def patchify(imgs, p):
    """(B, C, H, W) -> (B, L, p*p*C), each patch laid out (row, column, channel) as the official code."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)

def unpatchify(x, p, C=3):
    """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify."""
    B, L, _ = x.shape
    h = w = int(math.isqrt(L))
    x = x.reshape(B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)

def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embeddings (grid_size**2 + 1, dim), row 0 (the cls token's) zero: the
    column in the first half of the channels, the row in the second, as official get_2d_sincos_pos_embed."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def embed_1d(pos):  # (L,) -> (L, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)
    emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()

# -----------------------------------------------------------------------------
# transformer blocks (pre-norm, as timm's Block used by the official MAE)

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.kernel = None  # an SDPBackend to pin (runtime.pin_attention); None: PyTorch picks

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        with sdpa_kernel(self.kernel) if self.kernel is not None else nullcontext():
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        x = x + self.stochastic_depth(self.mlp(self.norm2(x)))
        return x

    def stochastic_depth(self, x):
        # drop the whole residual branch per sample, rescaling the survivors (fine-tuning only)
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        return x * torch.empty(x.shape[0], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep) / keep

def init_weights(module):
    # the official MAE's _init_weights: xavier-uniform linears with zero bias, unit LayerNorms
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

# -----------------------------------------------------------------------------
# ViT-Lite encoder

class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path=0.0):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        # a Linear on patchified pixels is the official stride-p Conv2d with its weight flattened
        # in (row, column, channel) order; one matrix product instead of a convolution
        self.patch_embed = nn.Linear(cfg.patch_size ** 2 * cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", sincos_pos_embed(D, cfg.img_size // cfg.patch_size)[None],
                             persistent=False)
        rates = torch.linspace(0, drop_path, cfg.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.apply(init_weights)
        bound = 1 / math.sqrt(self.patch_embed.in_features)  # the official Conv2d's default bias init
        nn.init.uniform_(self.patch_embed.bias, -bound, bound)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, imgs, ids_keep=None, final_norm=True):
        """imgs (B, C, H, W) -> (B, 1 + K, D): the cls token, then the patches in ids_keep (all if None)."""
        patches, pos = patchify(imgs, self.cfg.patch_size), self.pos_embed[:, 1:]  # (B, L, p*p*C), (1, L, D)
        if ids_keep is not None:
            # the visible patches are picked before the embedding, which works on each patch alone (the
            # official code embeds all, then picks: the same tokens, for four times the embedding's work)
            index = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
            patches, pos = torch.gather(patches, 1, index), pos[0, ids_keep]  # (B, K, p*p*C), (B, K, D)
        x = self.patch_embed(patches) + pos  # (B, K, D), or (B, L, D) with every patch
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if final_norm else x

# -----------------------------------------------------------------------------
# Masked Autoencoder

def random_masking(noise, mask_ratio):
    """Per-image random masking by sorting noise (B, L): the patches with the smallest noise are kept.
    Returns ids_keep (B, K), mask (B, L) with 0 = keep, 1 = remove, and ids_restore (B, L)."""
    B, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # the mask is 0 for the first len_keep patches in shuffled order, then unshuffled
    mask = (ids_restore >= len_keep).to(noise.dtype)
    return ids_keep, mask, ids_restore

class MAE(nn.Module):
    def __init__(self, cfg: ViTConfig, norm_pix_loss=True):
        super().__init__()
        self.cfg = cfg
        self.norm_pix_loss = norm_pix_loss
        self.encoder = Encoder(cfg)
        Dd = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("decoder_pos_embed",
                             sincos_pos_embed(Dd, cfg.img_size // cfg.patch_size)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * cfg.in_chans)
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs, mask_ratio, noise):
        ids_keep, mask, ids_restore = random_masking(noise, mask_ratio)
        latent = self.encoder(imgs, ids_keep)  # (B, 1 + K, D)
        return latent, mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        # append mask tokens after the visible patches, then unshuffle into image order
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # (B, L - K, Dd): one a hidden patch
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]  # (B, L, p*p*C), the cls token dropped

    def forward_loss(self, imgs, pred, mask):
        target = patchify(imgs, self.cfg.patch_size)  # (B, L, p*p*C)
        if self.norm_pix_loss:
            # each patch normalised by its own mean and (unbiased) variance, as the official forward_loss
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L), per-patch error
        return (loss * mask).sum() / mask.sum()  # mean over the removed patches only

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.cfg.num_patches, device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

# -----------------------------------------------------------------------------
# classifier for fine-tuning and linear probing

class AllProcessSum(torch.autograd.Function):
    """The sum of a tensor over the torchrun processes, with its gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    backward = forward  # every process's loss uses the sum: its gradient is the sum of theirs

class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that, under torchrun, normalises by the statistics of the whole global batch, so N
    processes train as one (torch's own SyncBatchNorm runs on GPUs only); in one process, BatchNorm1d."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x, n = x.float(), dist.get_world_size() * len(x)  # (B/N, D); every process has an equal slice
        mean = AllProcessSum.apply(x.sum(0)) / n
        var = AllProcessSum.apply(((x - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm1d keeps it
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps)

def classifier_head(dim, num_classes, batchnorm, init_std):
    """A Linear, or BatchNorm1d without affine parameters then the Linear (the reference's classifier and
    the linear probe's head); the Linear's weights drawn with init_std, as the official code's."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=init_std)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(SyncBatchNorm1d(dim, affine=False, eps=1e-6), linear) if batchnorm else linear

HEADS = ("linear", "batchnorm")  # the values of finetune.py's head setting

class Classifier(nn.Module):
    """The encoder with a head on the cls token ('cls') or on the mean of the patch tokens with a LayerNorm
    first ('avg', the official MAE fine-tuning's global pool)."""
    no_weight_decay = ("encoder.cls_token",)  # as the official fine-tuning's param_groups_lrd

    def __init__(self, cfg: ViTConfig, num_classes, pool="cls", drop_path=0.0, head="linear"):
        super().__init__()
        assert pool in ("cls", "avg") and head in HEADS, (pool, head)
        self.pool = pool
        self.encoder = Encoder(cfg, drop_path)
        if pool == "avg":  # the pooled tokens get fc_norm instead of the encoder's final norm
            self.encoder.norm.requires_grad_(False)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6) if pool == "avg" else nn.Identity()
        self.head = classifier_head(cfg.embed_dim, num_classes, head == "batchnorm", init_std=2e-5)

    def forward(self, imgs):
        if self.pool == "avg":
            x = self.encoder(imgs, final_norm=False)[:, 1:].mean(dim=1)  # (B, D)
        else:
            x = self.encoder(imgs)[:, 0]
        return self.head(self.fc_norm(x))

# -----------------------------------------------------------------------------
# optimizer groups, checkpoints

def param_groups(model, weight_decay, layer_decay=1.0, decay_all=False):
    """AdamW's parameter groups: weight decay on the weight matrices and tokens, none on biases, norms and
    model.no_weight_decay (with decay_all, on every parameter, as the reference's code); with layer_decay < 1
    the official fine-tuning's layer-wise lr (param_groups_lrd): with n blocks, the patch embedding and cls
    token are layer 0, block i layer i + 1, the rest layer n + 1; layer k learns at layer_decay ** (n + 1 - k)
    times the lr."""
    blocks = model.encoder.blocks if hasattr(model, "encoder") else []
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.patch_embed", "encoder.cls_token")):
            layer = 0
        else:
            layer = len(blocks) + 1
        decay = decay_all or not (p.ndim == 1 or name in getattr(model, "no_weight_decay", ()))
        scale = layer_decay ** (len(blocks) + 1 - layer)
        groups.setdefault((scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                           "lr_scale": scale})["params"].append(p)
    return list(groups.values())

def model_config(ckpt, path, pretraining=False):
    """The model settings a checkpoint records; with pretraining, a fine-tuning checkpoint is refused."""
    if pretraining and any(k.startswith("head.") for k in ckpt["model"]):
        raise SystemExit(f"error: {path} is a fine-tuning checkpoint; give a pre-training one (ckpt_EPOCH.pt "
                         f"of pretrain.py)")
    try:
        return ViTConfig(**ckpt["model_args"])
    except TypeError as e:
        raise SystemExit(f"error: {path} has model settings this model.py does not know ({e})")

def load_weights(module, state, path, what):
    """load_state_dict, a mismatch reported as one line naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise SystemExit(f"error: {path} does not hold {what} of the architecture its model_args describe "
                         f"({lines[1].strip() if len(lines) > 1 else lines[0]})")

def pretrained_encoder(ckpt, path, img_size):
    """The encoder of a pre-training checkpoint, and its config, for images of img_size."""
    cfg = model_config(ckpt, path, pretraining=True)
    if cfg.img_size != img_size:
        raise SystemExit(f"error: {path} was trained on {cfg.img_size}px images, the data are {img_size}px")
    encoder = Encoder(cfg)
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    load_weights(encoder, state, path, "an encoder")
    return encoder, cfg
