"""clip_loss: reference values, and distributed == single-process for values and gradients."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import free_port
from training.losses import clip_loss

D = 16


def reference_loss(image, text, scale):
    """The symmetric InfoNCE written out row by row, with no shortcuts."""
    total = 0.0
    n = image.shape[0]
    for i in range(n):
        logits_i = scale * (image[i] @ text.T)
        logits_t = scale * (text[i] @ image.T)
        total = total - torch.log_softmax(logits_i, 0)[i] - torch.log_softmax(logits_t, 0)[i]
    return total / (2 * n)


def make_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(math.log(1 / 0.07), dtype=torch.float64)


def single_process(image, text, log_scale):
    image, text, log_scale = (t.clone().requires_grad_() for t in (image, text, log_scale))
    loss = clip_loss(image, text, log_scale.exp())
    loss.backward()
    return loss.detach(), image.grad, text.grad, log_scale.grad


def test_matches_reference_and_open_clip():
    from open_clip.loss import ClipLoss

    image, text, log_scale = make_inputs(12)
    ours = clip_loss(image, text, log_scale.exp())
    assert torch.allclose(ours, reference_loss(image, text, log_scale.exp()), atol=1e-10)
    assert torch.allclose(ours, ClipLoss()(image, text, log_scale.exp()), atol=1e-10)
    # a one-element scale (what the DeepSpeed engine holds) is the same scale
    assert torch.allclose(ours, clip_loss(image, text, log_scale.exp().reshape(1)))


def test_perfect_alignment_and_temperature_direction():
    image, _, _ = make_inputs(8)
    low = clip_loss(image, image, torch.tensor(100.0, dtype=torch.float64))
    high = clip_loss(image, image, torch.tensor(1.0, dtype=torch.float64))
    assert low < high  # aligned pairs: a sharper softmax lowers the loss


def _worker(rank, world, port, image, text, log_scale, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = image.shape[0] // world
        mine = slice(rank * rows, (rank + 1) * rows)
        img = image[mine].clone().requires_grad_()
        txt = text[mine].clone().requires_grad_()
        ls = log_scale.clone().requires_grad_()
        loss = clip_loss(img, txt, ls.exp())
        loss.backward()
        out[rank] = (loss.detach(), img.grad, txt.grad, ls.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_single_process(world):
    image, text, log_scale = make_inputs(8 * world, seed=world)
    ref_loss, ref_img, ref_txt, ref_scale = single_process(image, text, log_scale)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, free_port(), image, text, log_scale, out), nprocs=world, join=True)
    losses = torch.stack([out[r][0] for r in range(world)])
    # averaged over ranks == single-process loss over the concatenated batch
    assert torch.allclose(losses.mean(), ref_loss, rtol=1e-5, atol=1e-5)
    # data-parallel convention: gradients are averaged over ranks
    img_grad = torch.cat([out[r][1] for r in range(world)]) / world
    txt_grad = torch.cat([out[r][2] for r in range(world)]) / world
    scale_grad = torch.stack([out[r][3] for r in range(world)]).mean()
    assert torch.allclose(img_grad, ref_img, atol=1e-4)
    assert torch.allclose(txt_grad, ref_txt, atol=1e-4)
    assert torch.allclose(scale_grad, ref_scale, atol=1e-4)
