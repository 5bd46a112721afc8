"""Image-only self-supervised losses as pure functions.

Shape legend: B = rows on this rank, W = world size, N = W * B (the global batch), D = embed dim,
K = queue size or number of prototypes, V = views per image.

As in ``training.losses``, a loss returns this rank's share: averaged over ranks it equals the
single-process loss over the concatenated batch, and after data-parallel gradient averaging the
gradients equal the single-process ones. Cross-rank gathers are explicit and differentiable where
the paper's negatives (or batch statistics) span the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training import distributed


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", SimCLR), negatives from all 2N views of every rank, gathered with gradient.

    With the 2N L2-normalised views u (the N first views, then the N second views) and pos(i) the
    other view of the same image::

        l_i = -log( exp(<u_i, u_pos(i)> / t) / sum_{k != i} exp(<u_i, u_k> / t) )
        loss = 1/(2N) * sum_i l_i

    Args:
        z_a: ``[B, D]`` first views' projections (normalised here).
        z_b: ``[B, D]`` second views' projections, row i is the same image as ``z_a`` row i.
        temperature: ``t``.

    Returns:
        0-dim tensor: this rank's share (the mean over its 2B anchors).
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a {tuple(z_a.shape)} and z_b {tuple(z_b.shape)} must have the same shape")
    z_a, z_b = F.normalize(z_a.float(), dim=-1), F.normalize(z_b.float(), dim=-1)
    rows, n = z_a.shape[0], z_a.shape[0] * distributed.world_size()
    candidates = torch.cat([distributed.all_gather_with_grad(z_a), distributed.all_gather_with_grad(z_b)])  # [2N, D]
    anchors = torch.cat([z_a, z_b])  # [2B, D]
    logits = anchors @ candidates.T / temperature  # [2B, 2N]
    own = torch.arange(rows, device=z_a.device) + distributed.rank() * rows  # global index of row i
    self_index = torch.cat([own, own + n])
    positive = torch.cat([own + n, own])
    logits[torch.arange(2 * rows, device=z_a.device), self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE against a queue (He et al. 2020, "Momentum Contrast for Unsupervised Visual
    Representation Learning"; Chen et al. 2020, "Improved Baselines with Momentum Contrastive
    Learning", MoCo v2)::

        l_i = -log( exp(<q_i, k_i> / t) / (exp(<q_i, k_i> / t) + sum_j exp(<q_i, m_j> / t)) )

    The positive is the key of the same image; the negatives ``m`` are the queue as it stood
    *before* this batch's keys are enqueued. Each rank's queries only need their own keys, so there
    is no gather here (the queue already holds every rank's keys).

    Args:
        q: ``[B, D]`` queries from the online encoder (normalised here).
        k: ``[B, D]`` keys from the momentum encoder (normalised here; no gradient flows into them).
        queue: ``[K, D]`` normalised keys of earlier batches.
        temperature: ``t``.
    """
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.detach().float(), dim=-1)
    positive = (q * k).sum(-1, keepdim=True)  # [B, 1]
    negative = q @ queue.detach().float().T  # [B, K]
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE against the keys of the global batch (Chen, Xie & He 2021, "An Empirical Study of
    Training Self-Supervised Vision Transformers", MoCo v3)::

        l_i = -log( exp(<q_i, k_i> / t) / sum_{j=1..N} exp(<q_i, k_j> / t) )
        loss = 2t * mean_i l_i

    No queue: the negatives are the momentum encoder's keys of the other N - 1 images of the global
    batch, gathered from every rank without gradient (keys are constants). The factor 2t is the
    paper's; it keeps the gradient's scale from depending on t.

    Args:
        q: ``[B, D]`` this rank's queries (online encoder and predictor; normalised here).
        k: ``[B, D]`` this rank's keys from the momentum encoder, row i the same image as ``q`` row i
            (normalised here).
        temperature: ``t``.
    """
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.detach().float(), dim=-1)
    keys = distributed.all_gather(k)  # [N, D]
    own = torch.arange(q.shape[0], device=q.device) + distributed.rank() * q.shape[0]
    return F.cross_entropy(q @ keys.T / temperature, own) * (2 * temperature)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE (Grill et al. 2020, "Bootstrap Your Own Latent")::

        loss = mean_i || p_i/|p_i| - z_i/|z_i| ||^2 = mean_i (2 - 2 cos(p_i, z_i))

    Args:
        p: ``[B, D]`` online predictions.
        z: ``[B, D]`` target projections; treated as constants (stop-gradient).
    """
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's negative cosine with stop-gradient (Chen & He 2021, "Exploring Simple Siamese
    Representation Learning")::

        loss = -mean_i cos(p_i, stopgrad(z_i))

    Args:
        p: ``[B, D]`` predictions of one view.
        z: ``[B, D]`` projections of the other view.
    """
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float) -> torch.Tensor:
    """Cross-correlation towards the identity (Zbontar et al. 2021, "Barlow Twins:
    Self-Supervised Learning via Redundancy Reduction")::

        C = (z_a - mean)/std ^T (z_b - mean)/std / N      ([D, D], statistics over the global batch)
        loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

    The batch statistics and the correlation span all N rows, gathered with gradient, so every rank
    computes the same loss.

    Args:
        z_a, z_b: ``[B, D]`` projections of the two views.
        lambd: weight of the redundancy-reduction (off-diagonal) terms.
    """
    z_a = distributed.all_gather_with_grad(z_a.float())  # [N, D]
    z_b = distributed.all_gather_with_grad(z_b.float())
    n = z_a.shape[0]
    z_a = (z_a - z_a.mean(0)) / z_a.std(0, unbiased=False).clamp_min(1e-6)
    z_b = (z_b - z_b.mean(0)) / z_b.std(0, unbiased=False).clamp_min(1e-6)
    c = z_a.T @ z_b / n  # [D, D]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Equipartitioned soft assignments of the global batch to prototypes (Caron et al. 2020,
    "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", SwAV).

    Sinkhorn-Knopp on ``Q = exp(scores / epsilon)^T`` ([K, N]): alternately make every prototype
    hold 1/K of the mass and every sample 1/N; the column sums run over all ranks.

    Args:
        scores: ``[B, K]`` prototype scores of this rank's rows.
    Returns:
        ``[B, K]`` assignments, each row summing to 1.
    """
    # In log space: exp(scores / epsilon) overflows fp32 once epsilon < ~0.011 (cosines / 0.01 > 88),
    # and shifted into range its far entries underflow to whole zero rows or columns (0 / 0). The
    # iterations are the same; the first normalisation over everything is dropped, as the row
    # normalisation that follows cancels any constant factor.
    log_q = scores.float().T / epsilon  # [K, B]
    k, n = log_q.shape[0], log_q.shape[1] * distributed.world_size()
    for _ in range(iters):
        log_q -= _global_logsumexp(log_q) + math.log(k)  # rows: one prototype over all samples
        log_q -= torch.logsumexp(log_q, dim=0, keepdim=True) + math.log(n)  # columns: one sample (local)
    return (log_q + math.log(n)).exp().T


def _global_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` of each row of ``x`` over its columns on every rank: ``[K, 1]``."""
    top = distributed.all_reduce_(x.max(1, keepdim=True).values, max_=True)
    return distributed.all_reduce_((x - top).exp().sum(1, keepdim=True)).log() + top


def swav_loss(scores: list[torch.Tensor], assignments: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020)::

        loss = 1/(G (V-1)) * sum_{g} sum_{v != g} mean_i -sum_k q^g_ik log softmax(s^v_i / t)_k

    Each global crop g's code ``q^g`` (from ``sinkhorn``) is predicted from every other crop v.

    Args:
        scores: V tensors ``[B, K]``: every crop's scores against the normalised prototypes; the
            first G = len(assignments) are the global crops.
        assignments: G tensors ``[B, K]``: the global crops' codes (no gradient).
        temperature: ``t``.
    """
    total, terms = 0.0, 0
    for g, q in enumerate(assignments):
        for v, s in enumerate(scores):
            if v != g:
                total = total - (q.detach() * F.log_softmax(s.float() / temperature, dim=-1)).sum(-1).mean()
                terms += 1
    return total / terms


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss, L^sup_out (Khosla et al. 2020, "Supervised Contrastive
    Learning"), over all V*N views of every rank, gathered with gradient::

        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(<u_i, u_p>/t) / sum_{a != i} exp(<u_i, u_a>/t) )

    where P(i) are the other views with the same label. With one image per label this is NT-Xent.

    Args:
        z: ``[B, V, D]`` projections of V views per image (normalised here).
        labels: ``[B]`` integer labels.
        temperature: ``t``.
    """
    rows, views = z.shape[0], z.shape[1]
    z = F.normalize(z.float(), dim=-1)
    anchors = z.transpose(0, 1).reshape(views * rows, -1)  # [V*B, D], view-major
    gathered = distributed.all_gather_with_grad(z).transpose(0, 1).reshape(-1, z.shape[-1])  # [V*N, D]
    all_labels = distributed.all_gather(labels).repeat(views)  # [V*N]
    n = rows * distributed.world_size()
    own = torch.arange(rows, device=z.device) + distributed.rank() * rows
    self_index = torch.cat([own + v * n for v in range(views)])  # [V*B]
    logits = anchors @ gathered.T / temperature  # [V*B, V*N]
    rows_index = torch.arange(views * rows, device=z.device)
    logits[rows_index, self_index] = float("-inf")
    log_prob = F.log_softmax(logits, dim=-1)
    positive = labels.repeat(views)[:, None] == all_labels[None, :]
    positive[rows_index, self_index] = False
    mean_log_prob = log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp_min(1)
    return -mean_log_prob.mean()
