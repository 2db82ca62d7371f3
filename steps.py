"""
One training step of each stage, and the evaluation pass: shared by pretrain.py, finetune.py and
bench.py, so the benchmark times exactly the code that training runs.

A step takes the global batch as uint8 (B, H, W, 3) on the device. Every process draws the random
augmentation of the whole global batch from the RNG seeded by (seed, iteration), then augments only
the images its slice needs: N processes train on exactly what one would (drop path aside: each process
draws its own), and a resumed run repeats an uninterrupted one.
The draws come first, eagerly (a few kernels); the pixel work that follows draws nothing, so with
compile it is compiled too, fusing its hundreds of small ops, and still sees eager mode's numbers.
With cuda_graph (one process on a GPU) the augmentation and the training update are each recorded
once as a CUDA graph and replayed (runtime.cuda_graphed): the same kernels, two launches a step.
"""
import torch
import torch.nn.functional as F

import augment
import data
import runtime


def compiled(fn, compile):
    # whole graph, static shapes: the augmentation has no data-dependent control flow
    return torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn


def rows_of(batch, rows):
    """The given rows of every tensor in batch, a nest of tuples and lists of per-image tensors."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    return None if batch is None else type(batch)(rows_of(part, rows) for part in batch)


def make_pretrain_step(model, optimizer, *, num_patches, batch_size, rank, world_size, seed,
                       crop_scale, mask_ratio, device, dtype, compile=False, cuda_graph=False):
    local = batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)

    def crop(images_u8, draws):
        return data.normalize(data.resized_crop_flip(data.to_float(images_u8), draws))
    crop = compiled(crop, compile)

    @torch.no_grad()  # in fp32, outside autocast
    def augment_batch(images_u8):
        draws = data.crop_flip_draws(batch_size, crop_scale, device=device)
        noise = torch.rand(batch_size, num_patches, device=device)  # fixes the masks
        # each image's crop needs only its own draws: a process crops just its slice of the batch
        return crop(*rows_of((images_u8, draws), mine)), noise[mine]  # (B/N, 3, H, W), (B/N, L)

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

    step.augment = augment_batch  # for bench.py: --check compares it, and it is timed alone
    return step


def make_finetune_step(model, optimizer, *, num_classes, batch_size, rank, world_size, seed, crop_scale,
                       rand_augment_ops, rand_augment_magnitude, rand_augment_interpolation, reprob, mixup,
                       cutmix, mixup_mode, label_smoothing, clip_grad, device, dtype, compile=False,
                       cuda_graph=False):
    # Mixup pairs image i with image B-1-i by flipping the batch. A process augments its slice and
    # then the mirror slice, which holds its partners: flipping those 2B/N rows pairs them as flipping
    # the whole batch does, so it need not augment all B (one process: the two slices are the same).
    local = batch_size // world_size
    mine = list(range(rank * local, (rank + 1) * local))
    mirror = [batch_size - 1 - i for i in reversed(mine)]
    rows = slice(mine[0], mine[-1] + 1) if mirror == mine else torch.tensor(mine + mirror, device=device)

    def transform(images_u8, labels, draws):
        # every process drew for the whole batch (the same numbers) and takes its rows' share
        images_u8, labels, (crop, rand_aug, erasing, mix) = rows_of((images_u8, labels, draws), rows)
        x = data.resized_crop_flip(data.to_float(images_u8), crop)  # (R, 3, H, W), 0..255
        x = augment.rand_augment(x, rand_aug, rand_augment_magnitude, interpolation=rand_augment_interpolation)
        x = data.normalize(x)
        if reprob > 0:
            x = augment.random_erasing(x, erasing, reprob)
        x, targets = augment.mixup_cutmix(x, labels, num_classes, mix, label_smoothing)
        return x[:local], targets[:local]  # (B/N, 3, H, W), (B/N, num_classes)
    transform = compiled(transform, compile)

    @torch.no_grad()
    def augment_batch(images_u8, labels):
        B, H, W, C = images_u8.shape
        crop = data.crop_flip_draws(B, crop_scale, device=device)  # drawn in the order the steps use them
        rand_aug = augment.rand_augment_draws(B, rand_augment_ops, device)
        erasing = augment.erasing_draws((B, C, H, W), device) if reprob > 0 else None
        mix = augment.mixup_draws(B, H, W, device, mixup, cutmix, mode=mixup_mode)
        return transform(images_u8, labels, (crop, rand_aug, erasing, mix))

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

    step.augment = augment_batch  # for bench.py: --check compares it, and it is timed alone
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
