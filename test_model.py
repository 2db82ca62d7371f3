"""
Tests of model.py against independent references: a straightforward MAE written here from the
paper and the official code's formulas, the official numpy position embeddings, F.conv2d.
Run with `python test_model.py` or pytest.
"""
import collections
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import runtime
from configurator import check_settings
from reconstruct import pictures
from model import (MAE, Classifier, ViTConfig, classifier_head, param_groups, patchify, random_masking,
                   sincos_pos_embed, unpatchify)

SMALL = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                  decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)


def report(name, a, b):
    diff = (a - b).abs().max().item()
    print(f"{name}: largest difference {diff:.3g}")
    return diff


# -----------------------------------------------------------------------------
# an independent MAE: official-style masking with a ones/gather mask, the patch embedding as the
# official stride-p convolution, attention written out as softmax(q k^T / sqrt(d)) v


def official_pos_embed(embed_dim, grid_size):
    """get_2d_sincos_pos_embed of the official MAE code (numpy), with the zero cls row."""
    def from_grid(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([from_grid(embed_dim // 2, grid[0]), from_grid(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def ref_block(x, sd, prefix, heads):
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def lin(t, name):
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    B, N, D = x.shape
    h = ln(x, f"{prefix}.norm1")
    q, k, v = lin(h, f"{prefix}.attn.qkv").split(D, dim=-1)
    q, k, v = (t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
    x = x + lin((att @ v).transpose(1, 2).reshape(B, N, D), f"{prefix}.attn.proj")
    h = ln(x, f"{prefix}.norm2")
    h = lin(h, f"{prefix}.mlp.fc1")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return x + lin(h, f"{prefix}.mlp.fc2")


def reference_mae(imgs, sd, cfg, noise, mask_ratio=0.75):
    p, D, Dd = cfg.patch_size, cfg.embed_dim, cfg.decoder_embed_dim
    gs = cfg.img_size // p
    L = gs * gs
    # patch embedding as the official Conv2d(3, D, p, stride p); our Linear is (row, col, channel)
    conv_w = sd["encoder.patch_embed.weight"].reshape(D, p, p, 3).permute(0, 3, 1, 2)
    x = F.conv2d(imgs, conv_w, sd["encoder.patch_embed.bias"], stride=p).flatten(2).transpose(1, 2)
    pos = torch.tensor(official_pos_embed(D, gs), dtype=imgs.dtype)[None]
    x = x + pos[:, 1:]
    # masking as in models_mae.random_masking
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, D))
    mask = torch.ones(imgs.shape[0], L, dtype=imgs.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = sd["encoder.cls_token"] + pos[:, :1]
    x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
    for i in range(cfg.depth):
        x = ref_block(x, sd, f"encoder.blocks.{i}", cfg.num_heads)
    x = F.layer_norm(x, (D,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], eps=1e-6)
    # decoder
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    tokens = sd["mask_token"].repeat(x.shape[0], L + 1 - x.shape[1], 1)
    x_ = torch.gather(torch.cat([x[:, 1:], tokens], dim=1), 1, ids_restore[..., None].repeat(1, 1, Dd))
    x = torch.cat([x[:, :1], x_], dim=1) + torch.tensor(official_pos_embed(Dd, gs), dtype=imgs.dtype)[None]
    for i in range(cfg.decoder_depth):
        x = ref_block(x, sd, f"decoder_blocks.{i}", cfg.decoder_num_heads)
    x = F.layer_norm(x, (Dd,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    # loss: per-patch normalised targets (torch.var is unbiased, as in the official code)
    target = imgs.reshape(-1, 3, gs, p, gs, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, L, p * p * 3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    return loss, pred, mask


# -----------------------------------------------------------------------------


def test_mae_matches_reference():
    torch.manual_seed(0)
    model = MAE(SMALL).double()
    imgs = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(3, SMALL.num_patches, dtype=torch.float64)
    loss, pred, mask = model(imgs, 0.75, noise)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    ref_loss, ref_pred, ref_mask = reference_mae(imgs, sd, SMALL, noise)
    assert torch.equal(mask, ref_mask)
    # float64 throughout, but the model keeps its position tables in float32 (about 1e-8 off)
    assert report("MAE loss vs reference", loss, ref_loss) < 1e-6
    assert report("MAE predictions vs reference", pred, ref_pred) < 1e-6


def test_default_config_is_the_reference_model():
    model = MAE(ViTConfig())
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    assert 3.5e6 < n_encoder < 3.9e6  # "about 3.7M parameters"
    assert model.encoder.pos_embed.shape == (1, 257, 256)
    loss, pred, mask = model(torch.randn(2, 3, 64, 64))
    assert pred.shape == (2, 256, 48) and mask.shape == (2, 256) and loss.ndim == 0


def test_pos_embed_matches_official_formula():
    for dim, gs in [(256, 16), (128, 16), (32, 4)]:
        ours = sincos_pos_embed(dim, gs)
        ref = torch.tensor(official_pos_embed(dim, gs), dtype=torch.float32)
        assert report(f"position embedding {dim}x{gs}", ours, ref) < 1e-6


def test_patchify_roundtrip_and_layout():
    imgs = torch.randn(2, 3, 16, 16)
    x = patchify(imgs, 4)
    assert x.shape == (2, 16, 48)
    assert torch.equal(unpatchify(x, 4), imgs)
    # patch 5 is row 1, column 1 of the grid; inside it the layout is (row, column, channel)
    assert torch.equal(x[1, 5].reshape(4, 4, 3), imgs[1, :, 4:8, 4:8].permute(1, 2, 0))


def test_patch_embedding_equals_strided_conv():
    enc = MAE(SMALL).encoder
    imgs = torch.randn(2, 3, 16, 16)
    ours = enc.patch_embed(patchify(imgs, 4))
    w = enc.patch_embed.weight.reshape(32, 4, 4, 3).permute(0, 3, 1, 2)
    conv = F.conv2d(imgs, w, enc.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    assert report("patch embedding vs conv", ours, conv) < 1e-5


def test_random_masking_invariants():
    noise = torch.rand(5, 256)
    ids_keep, mask, ids_restore = random_masking(noise, 0.75)
    assert ids_keep.shape == (5, 64)
    assert torch.equal(mask.sum(1), torch.full((5,), 192.0))
    for b in range(5):
        kept = set(ids_keep[b].tolist())
        assert kept == set(torch.topk(noise[b], 64, largest=False).indices.tolist())  # smallest noise kept
        assert kept == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(256).expand(5, -1))
    assert random_masking(torch.rand(2, 10), 0.75)[0].shape == (2, 2)  # int(L * (1 - ratio))


def test_encoder_sees_only_visible_patches():
    model = MAE(SMALL)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model(torch.randn(2, 3, 16, 16), 0.75)
    assert seen == [1 + 4, 1 + 16]  # encoder: cls + 4 of 16 patches; decoder: all


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = MAE(SMALL)
    imgs = torch.randn(2, 3, 16, 16)
    _, pred, mask = model(imgs, 0.75)
    pred = pred.detach().requires_grad_()
    loss = model.forward_loss(imgs, pred, mask)
    loss.backward()
    visible = mask == 0
    assert pred.grad[visible].abs().max() == 0 and pred.grad[~visible].abs().max() > 0
    changed = pred.detach().clone()
    changed[visible] += 100.0
    assert torch.equal(model.forward_loss(imgs, changed, mask), loss.detach())
    # raw-pixel loss: plain mean squared error over the masked patches
    model.norm_pix_loss = False
    target = patchify(imgs, 4)
    expected = ((pred.detach() - target) ** 2).mean(-1)[~visible].mean()
    assert report("raw-pixel loss", model.forward_loss(imgs, pred.detach(), mask), expected) < 1e-6


def test_official_initialisation():
    torch.manual_seed(0)
    model = MAE(ViTConfig())
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
            if name == "encoder.patch_embed":  # a Conv2d's default bias in the official code
                assert 0 < m.bias.abs().max() <= 1 / math.sqrt(fan_in), name
            else:
                assert torch.all(m.bias == 0), name
    for token in (model.encoder.cls_token, model.mask_token):
        assert 0.01 < token.std().item() < 0.03


def test_reconstruction_does_not_leak_hidden_patches():
    torch.manual_seed(0)
    model = MAE(SMALL).eval()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    _, masked, recon, pasted = pictures(model, imgs, noise, 0.75)
    _, mask, _ = random_masking(noise, 0.75)
    hidden = unpatchify(mask[..., None].expand(-1, -1, 48), 4).bool()
    altered = torch.where(hidden, imgs * 10 + 3, imgs)  # change only what the model must not see
    _, masked2, recon2, pasted2 = pictures(model, altered, noise, 0.75)
    assert torch.equal(recon, recon2) and torch.equal(pasted, pasted2) and torch.equal(masked, masked2)
    assert torch.equal(pasted[~hidden], imgs[~hidden])  # visible patches pasted back unchanged
    assert torch.all(masked[hidden] == 0)


def test_classifier_takes_encoder_weights_unchanged():
    torch.manual_seed(0)
    mae = MAE(SMALL)
    for pool in ("cls", "avg"):
        clf = Classifier(SMALL, num_classes=10, pool=pool)
        encoder_state = {k[len("encoder."):]: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
        clf.encoder.load_state_dict(encoder_state)
        for k, v in clf.encoder.state_dict().items():
            assert torch.equal(v, mae.state_dict()["encoder." + k]), k
        imgs = torch.randn(2, 3, 16, 16)
        assert torch.equal(clf.encoder(imgs), mae.encoder(imgs))
        assert clf(imgs).shape == (2, 10)


def test_batchnorm_head_is_torchs_batchnorm_then_linear():
    # the reference's classifier: the cls token, BatchNorm1d(affine=False, eps=1e-6), then the Linear; batch
    # statistics in training, the running ones in evaluation, both as torch's own modules compute them
    torch.manual_seed(0)
    clf = Classifier(SMALL, num_classes=10, pool="cls", head="batchnorm")
    torch.nn.init.normal_(clf.head[1].weight)  # weights of size 1, not the fresh head's 2e-5: differences show
    norm, linear = torch.nn.BatchNorm1d(32, affine=False, eps=1e-6), torch.nn.Linear(32, 10)
    linear.load_state_dict(clf.head[1].state_dict())
    for training in (True, True, False):
        clf.train(training), norm.train(training)
        features = clf.encoder(torch.randn(8, 3, 16, 16))[:, 0].detach() * 0.01  # small, where eps counts
        got, expected = clf.head(features), linear(norm(features))
        assert report(f"batchnorm head, training={training}", got, expected) < 1e-5
    imgs = torch.randn(8, 3, 16, 16)
    assert torch.equal(clf(imgs), clf.head(clf.encoder(imgs)[:, 0]))  # the head sits on the cls token
    assert torch.equal(clf.head[0].running_var, norm.running_var) and clf.head[0].num_batches_tracked == 2
    assert {k for k in clf.state_dict() if k.startswith("head.")} == {
        "head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}


@pytest.mark.parametrize("model", ["mae", "classifier", "probe head"])
def test_decay_all_puts_every_parameter_in_a_decayed_group(model):
    model = {"mae": lambda: MAE(SMALL), "classifier": lambda: Classifier(SMALL, 10, head="batchnorm"),
             "probe head": lambda: classifier_head(32, 10, batchnorm=True, init_std=0.01)}[model]()
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    for decay_all, layer_decay in ((True, 1.0), (True, 0.75), (False, 1.0)):
        groups = param_groups(model, 0.05, layer_decay, decay_all)
        decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trained)  # each parameter once
        if decay_all:
            assert decayed == trained
        else:  # the default leaves every bias undecayed (and the classifier's cls token)
            assert decayed < trained and all(p.ndim > 1 for g in groups if g["weight_decay"] for p in g["params"])


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    clf = Classifier(SMALL, num_classes=10, pool="avg", drop_path=0.5)
    imgs = torch.randn(64, 3, 16, 16)
    clf.eval()
    assert torch.equal(clf(imgs), clf(imgs))
    clf.train()
    a, b = clf(imgs), clf(imgs)
    assert not torch.equal(a, b)
    rates = [blk.drop_path for blk in clf.encoder.blocks]
    assert rates == [0.0, 0.5]  # grows linearly with depth
    # each sample's branch is dropped whole or kept and scaled by 1 / keep, so its mean is unchanged
    block = clf.encoder.blocks[1]
    out = block.stochastic_depth(torch.ones(100_000, 3, 4))
    per_sample = out[:, 0, 0]
    assert (out == per_sample[:, None, None]).all() and set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert abs(per_sample.mean().item() - 1.0) < 0.01  # 100,000 coin flips: standard error 0.003


def test_pinned_attention_kernels_run_in_each_part():
    # the CPU has two kernels: plain matrix products ('math') and a fused one ('flash')
    torch.manual_seed(0)
    mae, imgs, noise = MAE(SMALL), torch.randn(4, 3, 16, 16), torch.rand(4, SMALL.num_patches)
    auto_loss = mae(imgs, 0.75, noise)[0]
    runtime.pin_attention(mae, "encoder=math,decoder=flash", "cpu", "float32")
    with torch.profiler.profile() as prof:
        pinned_loss = mae(imgs, 0.75, noise)[0]
    kernels = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot"))
    assert kernels == {"aten::_scaled_dot_product_attention_math": SMALL.depth,
                       "aten::_scaled_dot_product_flash_attention_for_cpu": SMALL.decoder_depth}
    assert report("pinned vs PyTorch's own attention kernels, loss", pinned_loss, auto_loss) < 1e-5


@pytest.mark.parametrize("spec, message", [
    ("fastest", "it must be 'auto', one of flash, efficient, cudnn, math, or 'encoder=NAME,decoder=NAME'"),
    ("head=math", "it must be 'auto', one of flash, efficient, cudnn, math, or 'encoder=NAME,decoder=NAME'"),
    ("encoder=auto", "it must be 'auto', one of flash, efficient, cudnn, math, or 'encoder=NAME,decoder=NAME'"),
    ("encoder=cudnn", "the cudnn kernel does not run on cpu in float32"),
])
def test_bad_attention_setting_is_one_clear_error(spec, message):
    # a name that is not a kernel: the configurator's line; a kernel this device lacks: pin_attention's
    with pytest.raises(SystemExit, match=f"^error: attention={re.escape(repr(spec))}: {message}$"):
        check_settings({"attention": spec})
        runtime.pin_attention(MAE(SMALL), spec, "cpu", "float32")


if __name__ == "__main__":
    import sys
    sys.exit(pytest.main([__file__, "-q", "-s"]))
