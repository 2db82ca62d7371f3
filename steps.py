"""
One training step of each stage, and the evaluation pass: shared by pretrain.py, finetune.py and
bench.py, so the benchmark times exactly the code that training runs.

A step takes the global batch as uint8 (B, H, W, 3) on the device. Every process draws the random
augmentation of the whole global batch from the RNG seeded by (seed, iteration), then keeps its own
slice: N processes train on exactly what one would, and a resumed run repeats an uninterrupted one.
"""
import torch
import torch.nn.functional as F

import augment
import data
import runtime

# The augmentation is hundreds of small tensor ops (RandAugment alone runs every operation on the
# whole batch), so it is compiled too; two inductor settings keep its random draws exactly eager's:
# random ops call the eager kernels, in program order. Then compiled and plain runs see the same
# crops and masks, and bench.py --check compares like with like.
AUGMENT_COMPILE_OPTIONS = {"fallback_random": True, "reorder_for_locality": False}


def compiled(augment_fn, compile_augment):
    return torch.compile(augment_fn, dynamic=False, options=AUGMENT_COMPILE_OPTIONS) if compile_augment else augment_fn


def make_pretrain_step(model, optimizer, *, num_patches, batch_size, rank, world_size, seed,
                       crop_scale, mask_ratio, device, dtype, compile_augment=False):
    local = batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)

    @torch.no_grad()  # in fp32, outside autocast
    def augment_batch(images_u8):
        imgs = data.normalize(data.random_resized_crop_flip(data.to_float(images_u8), crop_scale))
        noise = torch.rand(batch_size, num_patches, device=device)  # fixes the masks
        return imgs[mine], noise[mine]  # (B/N, 3, H, W), (B/N, L)
    augment_batch = compiled(augment_batch, compile_augment)

    def step(images_u8, it):
        torch.compiler.cudagraph_mark_step_begin()  # with compile_mode='reduce-overhead': a new iteration
        runtime.seed_step(seed, it)
        imgs, noise = augment_batch(images_u8)
        with runtime.autocast(device, dtype):
            loss, _, _ = model(imgs, mask_ratio, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.augment = augment_batch  # for bench.py --check
    return step


def make_finetune_step(model, optimizer, *, num_classes, batch_size, rank, world_size, seed, crop_scale,
                       rand_augment_ops, rand_augment_magnitude, reprob, mixup, cutmix, label_smoothing,
                       clip_grad, device, dtype, compile_augment=False):
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
    augment_batch = compiled(augment_batch, compile_augment)

    def step(images_u8, labels, it):
        torch.compiler.cudagraph_mark_step_begin()
        runtime.seed_step(seed, it)
        x, targets = augment_batch(images_u8, labels)
        runtime.seed_step(seed, it, stream=1 + rank)  # this process's own draws (drop path)
        with runtime.autocast(device, dtype):
            logits = model(x)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

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
