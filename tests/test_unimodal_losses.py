"""Image-only losses: reference values, and distributed (gloo, world 2) == single-process.

NT-Xent, SupCon and Barlow Twins gather across ranks with gradient, MoCo v3 gathers its keys
without; Sinkhorn sums over ranks. At world size 2 each must give, averaged over ranks, the
single-process value over the concatenated batch, and (data-parallel averaged) the single-process
gradients.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import free_port
from training.unimodal.losses import barlow_twins_loss, moco_v3_loss, nt_xent_loss, sinkhorn, supcon_loss

ROWS, D = 5, 8  # per rank


def reference_nt_xent(z_a, z_b, t):
    """NT-Xent written out anchor by anchor over the 2N views."""
    u = F.normalize(torch.cat([z_a, z_b]), dim=-1)
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        logits = torch.stack([u[i] @ u[k] / t for k in others])
        total = total - (u[i] @ u[pos] / t - torch.logsumexp(logits, 0))
    return total / (2 * n)


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, D, generator=g, dtype=torch.float64)
    return z_a, z_a + 0.7 * torch.randn(n, D, generator=g, dtype=torch.float64)


def loss_and_grads(fn, z_a, z_b, labels):
    leaves = [t.clone().requires_grad_() for t in (z_a, z_b)]
    loss = fn(*leaves, labels)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


LABELS = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 1, 0])  # SupCon's, for the 2 * ROWS images
CASES = {  # (z_a, z_b, labels) -> loss
    "nt_xent": lambda a, b, y: nt_xent_loss(a, b, 0.3),
    "supcon": lambda a, b, y: supcon_loss(torch.stack([a, b], 1), y, 0.2),
    "barlow_twins": lambda a, b, y: barlow_twins_loss(a, b, 0.05),
    # symmetric, as the method uses it: each view is the query once and the (constant) key once
    "moco_v3": lambda a, b, y: moco_v3_loss(a, b, 0.2) + moco_v3_loss(b, a, 0.2),
}


def test_nt_xent_matches_reference():
    z_a, z_b = inputs(6)
    assert torch.allclose(nt_xent_loss(z_a.float(), z_b.float(), 0.3).double(), reference_nt_xent(z_a, z_b, 0.3),
                          atol=1e-5)
    # aligned views give a lower loss than unrelated ones
    assert nt_xent_loss(z_a, z_a, 0.3) < nt_xent_loss(z_a, torch.randn_like(z_a), 0.3)


def test_moco_v3_matches_reference_and_keys_take_no_gradient():
    q, k = inputs(6)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    t = 0.2
    expected = sum(-(qn[i] @ kn[i] / t - torch.logsumexp(qn[i] @ kn.T / t, 0)) for i in range(6)) / 6 * 2 * t
    q, k = q.float().requires_grad_(), k.float().requires_grad_()
    loss = moco_v3_loss(q, k, t)
    assert torch.allclose(loss.double(), expected, atol=1e-5)
    loss.backward()
    assert k.grad is None and q.grad.abs().sum() > 0
    assert moco_v3_loss(k, k, t) < moco_v3_loss(torch.randn_like(k), k, t)


def test_supcon_with_one_image_per_label_is_nt_xent():
    z_a, z_b = inputs(6)
    assert torch.allclose(supcon_loss(torch.stack([z_a, z_b], 1), torch.arange(6), 0.3),
                          nt_xent_loss(z_a, z_b, 0.3), atol=1e-6)


def test_barlow_twins_is_zero_for_decorrelated_identical_views():
    z = torch.linalg.qr(torch.randn(64, D, dtype=torch.float64))[0] * 8  # orthogonal columns
    z = z - z.mean(0)
    assert barlow_twins_loss(z, z, 0.1) < 0.2  # near identity: only the centring residue
    assert barlow_twins_loss(z, torch.randn_like(z), 0.1) > 1.0


def test_sinkhorn_equipartitions():
    q = sinkhorn(0.2 * torch.randn(30, 5, generator=torch.Generator().manual_seed(0)), epsilon=0.05, iters=50)
    assert torch.allclose(q.sum(1), torch.ones(30), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((5,), 6.0), atol=1e-2)


def _worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z_a, z_b = (t.float() for t in data)
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        results = {case: loss_and_grads(fn, z_a[mine], z_b[mine], LABELS[mine]) for case, fn in CASES.items()}
        results["sinkhorn"] = sinkhorn(z_a[mine] @ z_b[:4].T, 0.5, 3)
        out[rank] = results
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_equals_single_process():
    world = 2
    data = inputs(ROWS * world, seed=3)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), data, out), nprocs=world, join=True)
    z_a, z_b = (t.float() for t in data)
    for case, fn in CASES.items():
        ref_loss, ref_a, ref_b = loss_and_grads(fn, z_a, z_b, LABELS)
        ranks = [out[r][case] for r in range(world)]
        loss = torch.stack([r[0] for r in ranks]).mean()
        grad_a = torch.cat([r[1] for r in ranks]) / world  # data-parallel averaging
        grad_b = torch.cat([r[2] for r in ranks]) / world
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (case, loss, ref_loss)
        for got, ref in ((grad_a, ref_a), (grad_b, ref_b)):
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4, case
    codes = torch.cat([out[r]["sinkhorn"] for r in range(world)])
    assert torch.allclose(codes, sinkhorn(z_a @ z_b[:4].T, 0.5, 3), atol=1e-5)


def test_sinkhorn_is_finite_for_a_small_epsilon():
    """exp(cosine / 0.01) overflows fp32; the codes are computed shifted by the maximum (which the
    normalisation cancels), so they equal the same iterations done in float64."""
    scores = torch.nn.functional.normalize(torch.randn(32, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = sinkhorn(scores, epsilon=0.005, iters=3)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(32), atol=1e-5)
    ref = (scores.double() / 0.005 - scores.double().max() / 0.005).exp().T
    ref /= ref.sum()
    for _ in range(3):
        ref /= ref.sum(1, keepdim=True) * 6
        ref /= ref.sum(0, keepdim=True) * 32
    assert torch.allclose(q, (ref * 32).T.float(), atol=1e-5)
