"""
One training step of each stage, and the evaluation pass: shared by pretrain.py, finetune.py and
bench.py, so the benchmark times exactly the code that training runs.

A step takes the global batch as uint8 (B, H, W, 3) on the device. Every process draws the random
augmentation of the whole global batch from the RNG seeded by (seed, iteration), then keeps its own
slice: N processes train on exactly what one would, and a resumed run repeats an uninterrupted one.
With cuda_graph (one process on a GPU) the augmentation and the training update are each recorded
once as a CUDA graph and replayed (runtime.cuda_graphed): the same kernels, two launches a step.
"""
import torch
import torch.nn.functional as F

import augment
import data
import runtime


def make_pretrain_step(model, optimizer, *, num_patches, batch_size, rank, world_size, seed,
                       crop_scale, mask_ratio, device, dtype, cuda_graph=False):
    local = batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)

    @torch.no_grad()  # in fp32, outside autocast
    def augment_batch(images_u8):
        imgs = data.normalize(data.random_resized_crop_flip(data.to_float(images_u8), crop_scale))
        noise = torch.rand(batch_size, num_patches, device=device)  # fixes the masks
        return imgs[mine], noise[mine]  # (B/N, 3, H, W), (B/N, L)

    def train(imgs, noise):
        with runtime.autocast(device, dtype):
            loss, _, _ = model(imgs, mask_ratio, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if cuda_graph:
        runtime.make_capturable(optimizer, device)
        augment_batch, train = runtime.cuda_graphed(augment_batch), runtime.cuda_graphed(train)

    def step(images_u8, it):
        runtime.seed_step(seed, it)
        return train(*augment_batch(images_u8))

    step.augment = augment_batch  # for bench.py --check
    return step


def make_finetune_step(model, optimizer, *, num_classes, batch_size, rank, world_size, seed, crop_scale,
                       rand_augment_ops, rand_augment_magnitude, reprob, mixup, cutmix, label_smoothing,
                       clip_grad, device, dtype, cuda_graph=False):
    local = batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)

    @torch.no_grad()
    def augment_batch(images_u8, labels):
        x = data.random_resized_crop_flip(data.to_float(images_u8), crop_scale)  # (B, 3, H, W), 0..255
        if rand_augment_ops > 0:
            x = augment.rand_augment(x, rand_augment_ops, rand_augment_magnitude)
        x = data.normalize(x)
        if reprob > 0:
            x = augment.random_erasing(x, reprob)
        x, targets = augment.mixup_cutmix(x, labels, num_classes, mixup, cutmix, label_smoothing=label_smoothing)
        return x[mine], targets[mine]  # (B/N, 3, H, W), (B/N, C)

    def train(x, targets):
        with runtime.autocast(device, dtype):
            logits = model(x)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if cuda_graph:
        runtime.make_capturable(optimizer, device)
        augment_batch, train = runtime.cuda_graphed(augment_batch), runtime.cuda_graphed(train)

    def step(images_u8, labels, it):
        runtime.seed_step(seed, it)
        x, targets = augment_batch(images_u8, labels)
        runtime.seed_step(seed, it, stream=1 + rank)  # this process's own draws (drop path)
        return train(x, targets)

    step.augment = augment_batch
    return step


@torch.no_grad()
def evaluate(model, images_u8, labels, *, batch_size, device, dtype, resize_to=0):
    """Top-1 and top-5 accuracy (%) on uint8 images; resize_to > 0 first resizes to that size and
    takes the central crop, as the reference's evaluation does."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = torch.zeros((), device=device)
    for i in range(0, len(images_u8), batch_size):
        x = data.to_float(images_u8[i:i + batch_size])
        if resize_to > 0:
            x = data.resize_centre_crop(x, resize_to, x.shape[-1])
        with runtime.autocast(device, dtype):
            logits = model(data.normalize(x))
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top5 == labels[i:i + batch_size, None]
        correct1 = correct1 + hit[:, 0].sum()
        correct5 = correct5 + hit.any(dim=-1).sum()
    model.train(was_training)
    n = len(images_u8)
    return 100 * correct1.item() / n, 100 * correct5.item() / n
