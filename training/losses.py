"""Contrastive losses as pure functions.

Shape legend: B = rows on this rank, W = world size, N = W * B (the global batch), D = embed dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training import distributed


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    impl: str = "gather",
) -> torch.Tensor:
    """Symmetric image<->text InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models
    From Natural Language Supervision"), negatives from the whole global batch.

    For this rank's rows i (global index g = rank * B + i)::

        l_i = 1/2 * ( -log softmax_j(s * <x_i, y_j>)[g]  -  log softmax_j(s * <y_i, x_j>)[g] )
        loss = mean_i l_i,   j over all N rows of every rank

    The features of other ranks are gathered with gradient, so averaging this value over ranks
    gives the single-process loss over the concatenated batch, and after data-parallel gradient
    averaging the gradients equal the single-process ones. Without a process group it is the
    ordinary single-process loss.

    Args:
        image_features: ``[B, D]``, L2-normalised.
        text_features: ``[B, D]``, L2-normalised, row i pairs with image row i.
        logit_scale: the multiplicative scale ``exp(t)`` (scalar or one-element tensor), as
            open_clip models return it.
        impl: ``"gather"`` (all-gather with gradient, B x N logits per rank).

    Returns:
        0-dim tensor: this rank's share of the loss.
    """
    if impl != "gather":
        raise ValueError(f"unknown clip_loss impl '{impl}'")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same shape"
        )
    all_images = distributed.all_gather_with_grad(image_features)  # [N, D]
    all_texts = distributed.all_gather_with_grad(text_features)  # [N, D]
    scale = logit_scale.reshape(())
    logits_per_image = scale * image_features @ all_texts.T  # [B, N]
    logits_per_text = scale * text_features @ all_images.T  # [B, N]
    rows = image_features.shape[0]
    labels = torch.arange(rows, device=image_features.device) + distributed.rank() * rows
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
