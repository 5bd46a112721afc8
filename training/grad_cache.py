"""Contrastive gradient accumulation: one optimizer step over k micro-batches whose negatives are
all k micro-batches of every rank (GradCache: Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup").

Shape legend: B = micro-batch per rank, k = micro-batches per step, W = world size, D = embed dim.

Summing k micro-batch losses (DeepSpeed's plain accumulation) gives each sample only the
``B * W`` negatives of its own micro-batch. Instead:

1. forward every micro-batch without autograd and keep its features (``[B, D]`` each);
2. compute the loss over all cached features, ``k * B`` rows per rank and ``N = k * B * W`` in all,
   and its gradient with respect to the features, the temperature and the bias (autograd on
   detached leaves: no model activations are alive);
3. forward each micro-batch again with autograd and backpropagate the surrogate
   ``<features, cached gradient>``, whose gradient with respect to the weights is the chain rule's.

Activation memory is one micro-batch's; the price is one extra forward per micro-batch. The second
forward must reproduce the first: the RNG state is replayed per micro-batch (dropout), and BatchNorm
running statistics are put back after the first pass so each micro-batch updates them once.
BatchNorm still normalises with each micro-batch's own statistics, as any micro-batching does, so
for models with BatchNorm the step is close to, not equal to, one step on the k-times batch.

DeepSpeed: the engine is built with ``gradient_accumulation_steps = k``. Each micro-batch calls
``engine.backward(surrogate, scale_wrt_gas=False)`` (the cached gradient is already that of the
whole step, so no 1/k) and ``engine.step()``, which applies the update only at the k-th micro-step:
DeepSpeed's own boundary handling, so gradient reduction (at the boundary under ZeRO 0-1, per
micro-step into the partitions under ZeRO 2-3), clipping and the schedule behave as in any
accumulated step. Tested to equal the k-times batch under ZeRO 0, 1, 2 and 3
(tests/scripts/loss_accum.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

FEATURES = ("image_features", "text_features")
SCALARS = ("logit_scale", "logit_bias")  # parameters the loss sees directly, when the model has them

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def grad_cache_step(engine: Any, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn) -> torch.Tensor:
    """Forward, backward and DeepSpeed step of one optimizer step over ``micro_batches``.

    Args:
        engine: a DeepSpeed engine with ``gradient_accumulation_steps == len(micro_batches)``
            (anything with ``__call__(images, texts) -> dict``, ``backward`` and ``step``).
        micro_batches: ``(images, texts)`` pairs, already on the device.
        loss_fn: maps the model's output dict (``image_features`` ``[k*B, D]``, ``text_features``,
            ``logit_scale`` and, for SigLIP, ``logit_bias``) to this rank's loss share.

    Returns:
        the detached loss of the step.
    """
    if len(micro_batches) == 1:
        loss = loss_fn(engine(*micro_batches[0]))
        engine.backward(loss)
        engine.step()
        return loss.detach()
    steps = getattr(engine, "gradient_accumulation_steps", lambda: len(micro_batches))()
    if steps != len(micro_batches):
        raise ValueError(f"the engine accumulates {steps} micro-batches per step, not {len(micro_batches)}")
    cached, rng_states = _cache_outputs(engine, micro_batches)
    rng_after = _rng_state()
    leaves = {name: torch.cat([c[name] for c in cached]).float().requires_grad_() for name in FEATURES}
    leaves |= {name: cached[0][name].float().requires_grad_() for name in SCALARS if name in cached[0]}
    loss = loss_fn(leaves)
    loss.backward()
    rows = [c[FEATURES[0]].shape[0] for c in cached]
    grads = {name: leaves[name].grad.split(rows) if name in FEATURES else leaves[name].grad for name in leaves}
    for m, (images, texts) in enumerate(micro_batches):
        _set_rng_state(rng_states[m])
        out = engine(images, texts)
        surrogate = sum((out[name].float() * grads[name][m]).sum() for name in FEATURES)
        # the scalars take 1/k of their gradient from each micro-batch, so every micro-step
        # touches every parameter (DeepSpeed's reduction hooks expect as much)
        for name in SCALARS:
            if name in grads:
                surrogate = surrogate + (out[name].float() * grads[name]).sum() / len(micro_batches)
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    _set_rng_state(rng_after)
    return loss.detach()


def _cache_outputs(engine: Any, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[dict], list]:
    """Every micro-batch's features and scalars without autograd, and the RNG state before each."""
    cached, rng_states = [], []
    with torch.no_grad(), _norm_statistics_kept(engine.module):
        for images, texts in micro_batches:
            rng_states.append(_rng_state())
            out = engine(images, texts)
            cached.append({name: out[name].detach() for name in FEATURES + SCALARS if name in out})
    return cached, rng_states


@contextlib.contextmanager
def _norm_statistics_kept(module: torch.nn.Module) -> Iterator[None]:
    """Put every BatchNorm buffer (running mean, variance, count) back on exit."""
    buffers = [buffer for layer in module.modules() if isinstance(layer, torch.nn.modules.batchnorm._NormBase)
               for buffer in layer.buffers(recurse=False)]
    saved = [buffer.detach().clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
