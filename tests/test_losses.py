"""Losses: reference values, and distributed == single-process for values and gradients.

Every implementation (``gather``, ``tiled`` with tiles that do and do not divide the batch, and
``siglip``) is checked against a direct fp64 computation at world size 1 (in process) and 2 and 4
(gloo processes), for the loss and the gradients of both feature sets, the temperature and the bias.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import free_port
from training.losses import clip_loss, siglip_loss

D = 16
ROWS = 7  # per rank: not a multiple of the small tile
# (name, loss(image, text, scale, bias)); the tiny tiles split the batch unevenly, the big one does not split it
CASES = {
    "gather": lambda i, t, s, b: clip_loss(i, t, s),
    "tiled-3": lambda i, t, s, b: clip_loss(i, t, s, impl="tiled", tile_size=3),
    "tiled-5": lambda i, t, s, b: clip_loss(i, t, s, impl="tiled", tile_size=5),
    "tiled-1024": lambda i, t, s, b: clip_loss(i, t, s, impl="tiled", tile_size=1024),
    "siglip-3": lambda i, t, s, b: siglip_loss(i, t, s, b, tile_size=3),
    "siglip-1024": lambda i, t, s, b: siglip_loss(i, t, s, b, tile_size=1024),
}


def reference_loss(image, text, scale):
    """The symmetric InfoNCE written out row by row, with no shortcuts."""
    total = 0.0
    n = image.shape[0]
    for i in range(n):
        logits_i = scale * (image[i] @ text.T)
        logits_t = scale * (text[i] @ image.T)
        total = total - torch.log_softmax(logits_i, 0)[i] - torch.log_softmax(logits_t, 0)[i]
    return total / (2 * n)


def reference_siglip(image, text, scale, bias):
    """SigLIP over the full N x N matrix: -1/N sum_ij log sigmoid(z_ij (s <x_i, y_j> + b))."""
    n = image.shape[0]
    labels = 2 * torch.eye(n, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * (scale * image @ text.T + bias)).sum() / n


def reference(case):
    if case.startswith("siglip"):
        return reference_siglip
    return lambda i, t, s, b: reference_loss(i, t, s)


def make_inputs(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype), torch.tensor(math.log(1 / 0.07), dtype=dtype), torch.tensor(-3.0, dtype=dtype)


def loss_and_grads(fn, image, text, log_scale, bias, weight=1.0):
    image, text, log_scale, bias = (t.clone().requires_grad_() for t in (image, text, log_scale, bias))
    loss = fn(image, text, log_scale.exp(), bias)
    (weight * loss).backward()
    return loss.detach(), image.grad, text.grad, log_scale.grad, bias.grad


def single_process_reference(case, image, text, log_scale, bias):
    """fp64 reference on the same (rounded) inputs."""
    return loss_and_grads(reference(case), *(t.double() for t in (image, text, log_scale, bias)))


def assert_close(got, ref, what):
    """Values to 1e-5 relative (1e-6 absolute for a zero loss); gradients to 1e-4 of their scale."""
    loss, *grads = got
    ref_loss, *ref_grads = ref
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-6), (what, loss, ref_loss)
    for name, g, r in zip(("image", "text", "scale", "bias"), grads, ref_grads):
        if r is None or r.abs().max() == 0:  # the InfoNCE cases do not use the bias
            continue
        err = (g.double() - r).abs().max() / r.abs().max()
        assert err < 1e-4, (what, name, float(err))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 3, 12, 13])
def test_single_process_matches_reference(case, n):
    inputs = make_inputs(n, seed=n)
    assert_close(loss_and_grads(CASES[case], *inputs), single_process_reference(case, *inputs), (case, n))


def test_matches_open_clip():
    from open_clip.loss import ClipLoss, SigLipLoss

    image, text, log_scale, bias = make_inputs(12, dtype=torch.float64)
    ours = clip_loss(image, text, log_scale.exp())
    assert torch.allclose(ours, ClipLoss()(image, text, log_scale.exp()), atol=1e-10)
    assert torch.allclose(clip_loss(image, text, log_scale.exp(), impl="tiled", tile_size=5), ours, atol=1e-10)
    assert torch.allclose(siglip_loss(image, text, log_scale.exp(), bias, tile_size=5),
                          SigLipLoss()(image, text, log_scale.exp(), bias), atol=1e-10)
    # a one-element scale (what the DeepSpeed engine holds) is the same scale
    assert torch.allclose(ours, clip_loss(image, text, log_scale.exp().reshape(1)))
    assert torch.allclose(ours, clip_loss(image, text, log_scale.exp().reshape(1), impl="tiled"))


def test_perfect_alignment_and_temperature_direction():
    image, *_ = make_inputs(8, dtype=torch.float64)
    for impl in ("gather", "tiled"):
        low = clip_loss(image, image, torch.tensor(100.0, dtype=torch.float64), impl=impl)
        high = clip_loss(image, image, torch.tensor(1.0, dtype=torch.float64), impl=impl)
        assert low < high  # aligned pairs: a sharper softmax lowers the loss


def test_tiled_keeps_fp32_statistics_for_bf16_features():
    image, text, log_scale, bias = make_inputs(10)
    half = [t.bfloat16() for t in (image, text)]
    for fn in (CASES["tiled-3"], CASES["siglip-3"]):
        loss, g_image, g_text, g_scale, _ = loss_and_grads(fn, *half, log_scale, bias)
        ref_loss, r_image, r_text, r_scale, _ = loss_and_grads(fn, *(t.float() for t in half), log_scale, bias)
        assert loss.dtype == torch.float32 and loss == ref_loss  # computed in fp32 from the bf16 values
        assert g_image.dtype == torch.bfloat16 and torch.equal(g_image, r_image.bfloat16())
        assert torch.equal(g_text, r_text.bfloat16()) and torch.equal(g_scale, r_scale)


def _worker(rank, world, port, inputs, weights, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text, log_scale, bias = inputs
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        results = {case: loss_and_grads(fn, image[mine], text[mine], log_scale, bias) for case, fn in CASES.items()}
        # ranks weighting their losses differently: the cross-rank gradient must still be exact
        for case in ("gather", "tiled-3"):
            results[f"{case}-weighted"] = loss_and_grads(CASES[case], image[mine], text[mine], log_scale, bias,
                                                         weight=weights[rank])
        out[rank] = results
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_single_process(world):
    inputs = make_inputs(ROWS * world, seed=world)
    weights = [1.0 + r for r in range(world)]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), inputs, weights, out), nprocs=world, join=True)
    for case in CASES:
        ranks = [out[r][case] for r in range(world)]
        # averaged over ranks == single-process loss over the concatenated batch, and the
        # data-parallel convention: gradients are averaged over ranks
        combined = (
            torch.stack([r[0] for r in ranks]).mean(),
            torch.cat([r[1] for r in ranks]) / world,
            torch.cat([r[2] for r in ranks]) / world,
            torch.stack([r[3] for r in ranks]).mean(),
            torch.stack([r[4] for r in ranks]).mean() if ranks[0][4] is not None else None,
        )
        assert_close(combined, single_process_reference(case, *inputs), (case, world))
    gather = [out[r]["gather-weighted"] for r in range(world)]
    tiled = [out[r]["tiled-3-weighted"] for r in range(world)]
    for g, t in zip(gather, tiled):
        # fp32 sums in another order: well inside the 1e-4 gradient bar
        assert torch.allclose(g[1], t[1], rtol=1e-5, atol=1e-5) and torch.allclose(g[2], t[2], rtol=1e-5, atol=1e-5)
    assert torch.allclose(sum(g[3] for g in gather), sum(t[3] for t in tiled), atol=1e-5)
