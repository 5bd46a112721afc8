"""The small parts image-only methods are composed of: backbone, heads, momentum encoder, queue.

Shape legend: B = rows on this rank, W = world size, N = W * B, F = backbone features,
D = embed dim, K = queue size.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import distributed


def create_backbone(model_cfg: dict[str, Any]) -> tuple[nn.Module, int]:
    """The image tower of an open_clip model config, without its projection: ``(module, F)``.

    A timm tower (``vision_cfg.timm_model_name``) is built by timm with global pooling and no
    classifier, the features a linear probe of the CLIP tower would also see before its projection;
    any other tower is open_clip's own ``visual`` module (its output is the embedding).
    """
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        import timm

        backbone = timm.create_model(vision["timm_model_name"], pretrained=False, num_classes=0,
                                     global_pool=vision.get("timm_pool") or "avg")
        return backbone, backbone.num_features
    from training.model import create_model

    return create_model(model_cfg).visual, model_cfg["embed_dim"]


def mlp(in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, last_bn: bool = False,
        hidden_bn: bool = True) -> nn.Sequential:
    """``layers`` Linear layers with BatchNorm (``hidden_bn``) + ReLU between them (the heads of
    SimCLR, MoCo v2, BYOL, SimSiam and Barlow Twins differ only in width, depth and BatchNorm)."""
    parts: list[nn.Module] = []
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == layers - 1
        parts.append(nn.Linear(a, b, bias=not (last_bn if last else hidden_bn)))  # no bias before a BatchNorm
        if not last:
            parts += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)] if hidden_bn else [nn.ReLU(inplace=True)]
        elif last_bn:
            parts.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*parts)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy for a momentum (target) encoder: its parameters never get gradients nor join the
    optimizer (``training.optim`` skips ``requires_grad=False``), yet sit in the checkpoint."""
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameters only (a target's
    BatchNorm statistics come from its own forward passes, as in MoCo and BYOL).

    Under bf16 (DeepSpeed casts every parameter, the frozen target's too) the average runs on an
    fp32 copy of the target, made from its weights on first use, and the target's weights are that
    copy rounded: in bf16 itself a step of ``1 - momentum`` (0.01 down to 0) times the difference is
    mostly below half a unit in the last place, so the target would stop following.
    """
    params = list(target.parameters())
    masters = target.__dict__.get("_ema_fp32")
    if masters is None:  # an fp32 parameter is its own master
        masters = target.__dict__["_ema_fp32"] = [t if t.dtype == torch.float32 else t.detach().float() for t in params]
    for t, m, o in zip(params, masters, online.parameters()):
        m.mul_(momentum).add_(o.detach().float(), alpha=1 - momentum)
        if m is not t:
            t.copy_(m)


def ema_masters(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The fp32 masters ``ema_update_`` keeps for the bf16 targets in ``model``, by submodule name,
    on the CPU: a checkpoint must carry them, as the bf16 target alone loses the low bits (fp32
    targets are their own masters and are left out)."""
    found = {}
    for name, sub in model.named_modules():
        masters = sub.__dict__.get("_ema_fp32")
        if masters is not None and any(m is not t for m, t in zip(masters, sub.parameters())):
            found[name] = [m.detach().cpu().clone() for m in masters]
    return found


def restore_ema_masters(model: nn.Module, saved: dict[str, list[torch.Tensor]]) -> None:
    """Put back what ``ema_masters`` saved, so a resumed target follows the same fp32 average."""
    for name, masters in saved.items():
        sub = model.get_submodule(name)  # its parameters' shapes were checked by the module's load
        sub.__dict__["_ema_fp32"] = [t if t.dtype == torch.float32 else m.to(t.device, torch.float32)
                                     for m, t in zip(masters, sub.parameters())]


def cosine_momentum(step: int, total_steps: int, base: float, end: float = 1.0) -> float:
    """BYOL's schedule: ``end - (end - base) * (cos(pi * step / total) + 1) / 2``, base -> end."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - base) * (math.cos(math.pi * progress) + 1) / 2


class KeyQueue(nn.Module):
    """A FIFO queue of normalised embeddings (MoCo's keys, SwAV's earlier crops), a buffer so
    checkpoints carry it.

    ``enqueue`` writes the gathered keys of every rank (rank order) at ``ptr``, wrapping around, so
    the oldest keys are overwritten first; the size is independent of the batch.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=-1))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``[n, D]`` keys (already gathered over ranks)."""
        size, n = self.keys.shape[0], keys.shape[0]
        if n > size:  # only the newest ``size`` keys can stay
            keys, n = keys[-size:], size
        index = (self.ptr + torch.arange(n, device=keys.device)) % size
        self.keys[index] = keys.to(self.keys.dtype)
        self.ptr.fill_(int((self.ptr + n) % size))


def shuffled_forward(encoder: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """``encoder(x)`` with the global batch shuffled across ranks (MoCo's shuffling BN).

    BatchNorm statistics computed on the same images as their positives leak which key matches
    which query; shuffling the key batch over ranks puts each image's key in another rank's
    BatchNorm batch. The permutation comes from ``seed``, identical on every rank, so no broadcast
    is needed. At world size 1 this is ``encoder(x)``. Outside autograd (keys take no gradient).
    """
    world = distributed.world_size()
    if world == 1:
        return encoder(x)
    with torch.no_grad():
        rows, rank = x.shape[0], distributed.rank()
        full = distributed.all_gather(x)  # [N, ...]
        perm = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)
        mine = perm[rank * rows : (rank + 1) * rows]
        out = distributed.all_gather(encoder(full[mine]))  # rows in shuffled order
        unshuffled = torch.empty_like(out)
        unshuffled[perm] = out
        return unshuffled[rank * rows : (rank + 1) * rows]


def split_views(flat: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """``[B, sum(prod(shape))]`` from ``transforms.MultiView`` -> one ``[B, *shape]`` per view."""
    total = sum(math.prod(shape) for shape in shapes)
    if total != flat.shape[1]:
        raise ValueError(f"views take {total} values per sample, the batch holds {flat.shape[1]}")
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[:, offset : offset + size].reshape(flat.shape[0], *shape))
        offset += size
    return views
