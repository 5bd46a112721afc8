"""Contrastive losses as pure functions.

Shape legend: B = rows on this rank, W = world size, N = W * B (the global batch), D = embed dim,
T = tile side. ``s`` is the multiplicative logit scale ``exp(t)``, ``b`` SigLIP's logit bias.

Every loss returns this rank's share: averaged over ranks it equals the single-process loss over
the concatenated batch, and after data-parallel gradient averaging the gradients equal the
single-process ones. Every rank must hold the same number of rows.

The tiled losses look at the similarity matrix ``S = s * X @ Y.T`` ([N, N], image rows, text
columns) through rank r's row block ``S[rB:(r+1)B, :]``, ``T x T`` tiles at a time. They keep only
the gathered text features and per-row / per-column statistics between forward and backward; each
tile is recomputed in backward. Memory is O(N * D + T^2) instead of O(B * N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training import distributed

DEFAULT_TILE_SIZE = 1024


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    impl: str = "gather",
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """Symmetric image<->text InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models
    From Natural Language Supervision"), negatives from the whole global batch.

    For this rank's rows i (global index g = rank * B + i)::

        l_i = 1/2 * ( -log softmax_j(s * <x_i, y_j>)[g]  -  log softmax_j(s * <y_i, x_j>)[g] )
        loss = mean_i l_i,   j over all N rows of every rank

    Args:
        image_features: ``[B, D]``, L2-normalised.
        text_features: ``[B, D]``, L2-normalised, row i pairs with image row i.
        logit_scale: the multiplicative scale ``exp(t)`` (scalar or one-element tensor), as
            open_clip models return it.
        impl: ``"gather"``: all-gather both feature sets with gradient and build the ``[B, N]``
            logits of both directions (open_clip's ``local_loss`` + ``gather_with_grad``).
            ``"tiled"``: the same value and gradients from ``T x T`` tiles, memory linear in N
            (Inf-CL, Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size
            Scaling for Contrastive Loss"); see ``_TiledInfoNCE``.
        tile_size: ``T`` for ``"tiled"``.

    Returns:
        0-dim tensor: this rank's share of the loss.
    """
    _check_pairs(image_features, text_features)
    if impl == "tiled":
        return _TiledInfoNCE.apply(image_features, text_features, logit_scale, tile_size)
    if impl != "gather":
        raise ValueError(f"unknown clip_loss impl '{impl}'")
    all_images = distributed.all_gather_with_grad(image_features)  # [N, D]
    all_texts = distributed.all_gather_with_grad(text_features)  # [N, D]
    scale = logit_scale.reshape(())
    logits_per_image = scale * image_features @ all_texts.T  # [B, N]
    logits_per_text = scale * text_features @ all_images.T  # [B, N]
    rows = image_features.shape[0]
    labels = torch.arange(rows, device=image_features.device) + distributed.rank() * rows
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training")::

        loss = -1/N * sum_{i, j} log sigmoid(z_ij * (s * <x_i, y_j> + b)),   z_ij = 1 if i == j else -1

    This rank's share sums its B image rows against all N texts and divides by B (open_clip's
    ``SigLipLoss`` convention). The texts are gathered without gradient and the ``[B, N]`` logits
    are visited in ``T x T`` tiles, recomputed in backward, so memory does not grow with the
    world size beyond the O(N * D) features; see ``_TiledSigLIP``.

    Args:
        image_features: ``[B, D]``, L2-normalised.
        text_features: ``[B, D]``, L2-normalised, row i pairs with image row i.
        logit_scale: ``exp(t')`` (scalar or one-element tensor); the paper starts at ``t' = log 10``.
        logit_bias: ``b`` (scalar or one-element tensor); the paper starts at ``-10``.
        tile_size: ``T``.

    Returns:
        0-dim tensor: this rank's share of the loss.
    """
    _check_pairs(image_features, text_features)
    return _TiledSigLIP.apply(image_features, text_features, logit_scale, logit_bias, tile_size)


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same shape"
        )


def _tiles(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ValueError(f"tile_size must be >= 1, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 features (the statistics never drop below fp32), fp64 for fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _scalar(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).reshape(())


class _TiledInfoNCE(torch.autograd.Function):
    """InfoNCE over rank r's row block of ``S = s X Y^T``, exact, tile by tile.

    Rank r's share is ``L_r = 1/(2B) sum_{i in r} (rlse_i + clse_i - 2 S_ii)`` with
    ``rlse_i = logsumexp_j S_ij`` (image -> text) and ``clse_i = logsumexp_k S_ki`` (text -> image,
    a column of S). Rank r sees every column of its row block, so its ``rlse`` is complete; each
    column's ``clse`` sums partial log-sum-exps from every rank's row block (a ``[W, N]`` gather).
    One ``[B, N]`` block per rank thus serves both directions: 1 matmul per tile in forward,
    3 in backward (recompute, ``G @ Y``, ``G^T @ X``), against 2 + 4 for the gathered logits.

    Backward, with ``w_q`` the output gradient of rank q and ``q(j)`` the owner of column j, the
    gradient of ``sum_q w_q L_q`` (what data-parallel training differentiates) on this row block::

        G_ij = w_r/(2B) * softmax_row(S)_ij + w_q(j)/(2B) * softmax_col(S)_ij - w_r/B * [j == rB + i]
        dx_i = s * sum_j G_ij y_j        (complete on rank r: x_i lives in no other row block)
        dy_j = s * sum_i G_ij x_i        (a part: summed over ranks, each keeps its own rows)
        ds   = sum_ij G_ij <x_i, y_j>    (a part: the ranks' parts sum to the total, so the
                                          data-parallel average is the single-process gradient)

    Tiles and statistics are fp32 (fp64 for fp64 features) whatever the feature dtype; gradients
    come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, tile_size):
        dtype = _compute_dtype(image)
        x, y = image.detach().to(dtype), text.detach().to(dtype)
        s = _scalar(logit_scale, dtype)
        texts = distributed.all_gather(y)  # [N, D]
        rows, n = x.shape[0], texts.shape[0]
        xs = x * s
        row_lse = torch.empty(rows, dtype=dtype, device=x.device)
        col_part = torch.full((n,), -torch.inf, dtype=dtype, device=x.device)
        for r in _tiles(rows, tile_size):
            acc = torch.full((r.stop - r.start,), -torch.inf, dtype=dtype, device=x.device)
            for c in _tiles(n, tile_size):
                logits = xs[r] @ texts[c].T  # [T, T]
                acc = torch.logaddexp(acc, logits.logsumexp(1))
                col_part[c] = torch.logaddexp(col_part[c], logits.logsumexp(0))
            row_lse[r] = acc
        parts = distributed.all_gather(col_part.unsqueeze(0))  # [W, N]
        col_lse = parts.logsumexp(0) if parts.shape[0] > 1 else col_part
        own = slice(distributed.rank() * rows, (distributed.rank() + 1) * rows)
        positives = (xs * y).sum()
        loss = (row_lse.sum() + col_lse[own].sum() - 2 * positives) / (2 * rows)
        ctx.save_for_backward(x, y, texts, row_lse, col_lse, s)
        ctx.tile_size, ctx.own = tile_size, own
        ctx.dtypes = (image.dtype, text.dtype, logit_scale.dtype, logit_scale.shape)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, y, texts, row_lse, col_lse, s = ctx.saved_tensors
        rows, own = x.shape[0], ctx.own
        g = grad.detach().to(x.dtype).reshape(1)
        g_all = distributed.all_gather(g)  # [W]
        uniform = bool((g_all == g_all[0]).all())
        col_weight = None if uniform else g_all.repeat_interleave(rows)  # [N]
        xs = x * s
        sum_x, sum_y = torch.zeros_like(x), torch.zeros_like(texts)  # sum_j P_ij y_j, sum_i P_ij x_i
        for r in _tiles(rows, ctx.tile_size):
            for c in _tiles(texts.shape[0], ctx.tile_size):
                logits = xs[r] @ texts[c].T
                p = (logits - row_lse[r, None]).exp_()
                q = logits.sub_(col_lse[None, c]).exp_()
                if col_weight is not None:
                    p.mul_(g)
                    q.mul_(col_weight[None, c])
                p.add_(q)
                sum_x[r].addmm_(p, texts[c])
                sum_y[c].addmm_(p.T, x[r])
        weight = (g if uniform else torch.ones_like(g)) / (2 * rows)
        diagonal = g / rows  # each positive pair enters as -S_ii twice, both with rank r's gradient
        grad_scale = weight * (x * sum_x).sum() - diagonal * (x * y).sum()
        grad_image = s * (weight * sum_x - diagonal * y)
        grad_texts = sum_y.mul_(s * weight)
        grad_texts[own] -= s * diagonal * x
        grad_text = distributed.all_reduce_(grad_texts)[own].clone()  # a view would keep all N rows alive
        image_dtype, text_dtype, scale_dtype, scale_shape = ctx.dtypes
        return (grad_image.to(image_dtype), grad_text.to(text_dtype),
                grad_scale.reshape(scale_shape).to(scale_dtype), None)


class _TiledSigLIP(torch.autograd.Function):
    """SigLIP over rank r's ``[B, N]`` logits ``l = s X_r Y^T + b``, tile by tile.

    Forward uses ``-log sigmoid(-l) = softplus(l)`` for every pair, then corrects the positives
    (``softplus(l) - l = softplus(-l)``)::

        L_r = 1/B * (sum_ij softplus(l_ij) - sum_i l_ii)

    Backward, with ``g`` this rank's output gradient and ``G = g/B * (sigmoid(l) - I)``::

        dx_i = s * sum_j G_ij y_j,   dy_j = s * sum_i G_ij x_i (summed over ranks),
        ds = sum_ij G_ij <x_i, y_j>,   db = sum_ij G_ij
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, tile_size):
        dtype = _compute_dtype(image)
        x, y = image.detach().to(dtype), text.detach().to(dtype)
        s, b = _scalar(logit_scale, dtype), _scalar(logit_bias, dtype)
        texts = distributed.all_gather(y)  # [N, D]
        xs = x * s
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for r in _tiles(x.shape[0], tile_size):
            for c in _tiles(texts.shape[0], tile_size):
                logits = torch.addmm(b, xs[r], texts[c].T)
                total += F.softplus(logits).sum().double()
        positives = (xs * y).sum().double() + x.shape[0] * b.double()
        loss = ((total - positives) / x.shape[0]).to(dtype)
        ctx.save_for_backward(x, y, texts, s, b)
        ctx.tile_size = tile_size
        ctx.dtypes = (image.dtype, text.dtype, logit_scale.dtype, logit_scale.shape,
                      logit_bias.dtype, logit_bias.shape)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, y, texts, s, b = ctx.saved_tensors
        rows = x.shape[0]
        own = slice(distributed.rank() * rows, (distributed.rank() + 1) * rows)
        xs = x * s
        sum_x, sum_y = torch.zeros_like(x), torch.zeros_like(texts)
        sum_p = torch.zeros((), dtype=torch.float64, device=x.device)
        for r in _tiles(rows, ctx.tile_size):
            for c in _tiles(texts.shape[0], ctx.tile_size):
                p = torch.addmm(b, xs[r], texts[c].T).sigmoid_()
                sum_p += p.sum().double()
                sum_x[r].addmm_(p, texts[c])
                sum_y[c].addmm_(p.T, x[r])
        weight = grad.detach().to(x.dtype).reshape(()) / rows
        grad_scale = weight * ((x * sum_x).sum() - (x * y).sum())
        grad_bias = weight * (sum_p - rows).to(x.dtype)
        grad_image = (s * weight) * (sum_x - y)
        grad_texts = sum_y.mul_(s * weight)
        grad_texts[own] -= (s * weight) * x
        grad_text = distributed.all_reduce_(grad_texts)[own].clone()  # a view would keep all N rows alive
        image_dtype, text_dtype, scale_dtype, scale_shape, bias_dtype, bias_shape = ctx.dtypes
        return (grad_image.to(image_dtype), grad_text.to(text_dtype),
                grad_scale.reshape(scale_shape).to(scale_dtype),
                grad_bias.reshape(bias_shape).to(bias_dtype), None)
