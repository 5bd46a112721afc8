"""AdamW with parameter groups, a temperature bound, and warmup + cosine.

The temperature bound lives in the optimizer, not in the trainer: under ZeRO the optimizer updates
its own fp32 partition of ``logit_scale`` and copies it into the module afterwards, so clamping the
module's copy after ``step()`` is overwritten on the next step. DeepSpeed swaps each param group's
``params`` for its partitions but keeps the group's other keys, so a ``max_value`` key on the
temperature's own group reaches exactly the tensor the optimizer updates, under every stage.
"""

from __future__ import annotations

import math

import torch

from training.config import OptimConfig

# Names whose parameters take no weight decay even when 2-D (open_clip's embeddings).
_NO_DECAY_NAMES = ("embedding", "logit_scale", "logit_bias", "bias", "ln", "norm", "bn")


def param_groups(
    model: torch.nn.Module, weight_decay: float, max_logit_scale: float
) -> list[dict]:
    """Decay on weight matrices only; biases, norms, embeddings and the temperature get none."""
    decay, no_decay, temperature = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("logit_scale"):
            temperature.append(param)
        elif param.ndim < 2 or any(part in name.lower() for part in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": temperature, "weight_decay": 0.0, "max_value": math.log(max_logit_scale)},
    ]
    return [g for g in groups if g["params"]]


class ClampedAdamW(torch.optim.AdamW):
    """AdamW that clamps each group with a ``max_value`` key after every update."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if "max_value" in group:
                for param in group["params"]:
                    param.clamp_(max=group["max_value"])
        return loss


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, max_logit_scale: float) -> ClampedAdamW:
    return ClampedAdamW(
        param_groups(model, cfg.weight_decay, max_logit_scale),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warmup to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``total_steps``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
