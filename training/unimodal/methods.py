"""SimCLR, MoCo v2 and v3, BYOL, SimSiam, Barlow Twins, SwAV and SupCon, each a composition of ``parts``.

Shape legend: B = images on this rank, V = views, F = backbone features, D = embed dim.

A method is an ``nn.Module`` holding the ``backbone`` (what evaluation and export keep) and its
heads, target encoders and queues, so one DeepSpeed engine trains it and one checkpoint holds it.
``forward(views, labels)`` returns ``{"loss": this rank's share, "embedding": [B, D] projections
for the collapse monitor}``; ``after_step`` runs once per optimizer step (momentum updates).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from training import distributed
from training.config import MethodConfig
from training.unimodal.losses import (barlow_twins_loss, byol_loss, moco_loss, moco_v3_loss, nt_xent_loss,
                                      simsiam_loss, sinkhorn, supcon_loss, swav_loss)
from training.unimodal.parts import (KeyQueue, cosine_momentum, ema_update_, frozen_copy, mlp,
                                     shuffled_forward)

log = logging.getLogger(__name__)

METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        METHODS[name] = cls
        cls.name = name
        return cls

    return add


class Method(nn.Module):
    """Backbone plus what the method adds."""

    name = ""
    default_temperature: float | None = None  # the paper's softmax temperature; None: the loss has none
    paper_momentum = float("nan")  # methods with a target network: the paper's base EMA momentum
    needs_labels = False

    def __init__(self, backbone: nn.Module, dim: int, cfg: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.temperature = None if self.default_temperature is None else cfg.temperature or self.default_temperature
        self.base_momentum = cfg.momentum if cfg.momentum >= 0 else self.paper_momentum
        self.momentum = float("nan")  # the last EMA momentum, for the metrics (nan: no target)

    def encode(self, views: list[torch.Tensor], *modules: nn.Module) -> torch.Tensor:
        """Same-size views through ``modules`` as one batch: ``[V*B, ...]``, view-major."""
        x = torch.cat(views)
        for module in modules:
            x = module(x)
        return x

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``."""


@register("simclr")
class SimCLR(Method):
    default_temperature = 0.5

    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg)
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, views, labels=None):
        z_a, z_b = self.encode(views[:2], self.backbone, self.projector).chunk(2)
        return {"loss": nt_xent_loss(z_a, z_b, self.temperature), "embedding": z_a}


@register("supcon")
class SupCon(SimCLR):
    default_temperature = 0.1
    needs_labels = True

    def forward(self, views, labels=None):
        if labels is None:
            raise ValueError("supcon needs labels")
        z = self.encode(views[:2], self.backbone, self.projector)
        z = torch.stack(z.chunk(2), dim=1)  # [B, 2, D]
        return {"loss": supcon_loss(z, labels, self.temperature), "embedding": z[:, 0]}


class MomentumKeys(Method):
    """A method whose keys come from a momentum copy of the backbone and projector (MoCo v2, v3)."""

    default_temperature = 0.2

    def __init__(self, backbone, dim, cfg, projector: nn.Module):
        super().__init__(backbone, dim, cfg)
        self.projector = projector
        self.key_backbone, self.key_projector = frozen_copy(backbone), frozen_copy(projector)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # seeds the key shuffle
        self.momentum = self.base_momentum
        if cfg.shuffle_bn and distributed.world_size() == 1:
            log.warning("method.shuffle_bn has no effect in one process: the keys' BatchNorm batch is the "
                        "queries' images (run --nproc >= 2 to shuffle keys across ranks)")

    def keys(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Normalised keys ``[V*B, D]``, view-major; with ``shuffle_bn`` the batch is shuffled across
        ranks around the key encoder (MoCo's stand-in for SyncBN)."""
        key_encoder = lambda x: self.key_projector(self.key_backbone(x))  # noqa: E731
        with torch.no_grad():
            x = torch.cat(views)
            k = shuffled_forward(key_encoder, x, int(self.calls)) if self.cfg.shuffle_bn else key_encoder(x)
            self.calls += 1
            return F.normalize(k.float(), dim=-1)

    def update_keys(self, momentum: float) -> None:
        self.momentum = momentum
        ema_update_(self.key_backbone, self.backbone, momentum)
        ema_update_(self.key_projector, self.projector, momentum)


@register("moco")
class MoCo(MomentumKeys):
    """MoCo v2 with the symmetric loss: both views serve as query and as key. Its head is the
    paper's, Linear-ReLU-Linear, without BatchNorm."""

    paper_momentum = 0.999

    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg, mlp(dim, cfg.proj_hidden, cfg.proj_dim, hidden_bn=False))
        self.queue = KeyQueue(cfg.queue_size, cfg.proj_dim)

    def forward(self, views, labels=None):
        q_a, q_b = self.encode(views[:2], self.backbone, self.projector).chunk(2)
        k_a, k_b = self.keys(views[:2]).chunk(2)
        negatives = self.queue.keys.clone()  # this batch's keys are enqueued only after
        loss = (moco_loss(q_a, k_b, negatives, self.temperature) + moco_loss(q_b, k_a, negatives, self.temperature)) / 2
        self.queue.enqueue(distributed.all_gather(torch.cat([k_a, k_b])))
        return {"loss": loss, "embedding": q_a}

    def after_step(self, step, total_steps):
        self.update_keys(self.base_momentum)


@register("moco_v3")
class MoCoV3(MomentumKeys):
    """MoCo v3: a 3-layer projector ending in BatchNorm and a predictor on the query side, the
    other keys of the global batch as negatives (no queue), and BYOL's cosine momentum schedule.
    The default temperature is the paper's for ResNets, 1.0 (its ViTs use 0.2)."""

    default_temperature = 1.0
    paper_momentum = 0.99

    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg, mlp(dim, cfg.proj_hidden, cfg.proj_dim, layers=3, last_bn=True))
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim) if cfg.predictor else nn.Identity()

    def forward(self, views, labels=None):
        z = self.encode(views[:2], self.backbone, self.projector)
        q_a, q_b = self.predictor(z).chunk(2)
        k_a, k_b = self.keys(views[:2]).chunk(2)
        loss = moco_v3_loss(q_a, k_b, self.temperature) + moco_v3_loss(q_b, k_a, self.temperature)
        return {"loss": loss, "embedding": z.chunk(2)[0]}

    def after_step(self, step, total_steps):
        self.update_keys(cosine_momentum(step, total_steps, self.base_momentum, self.cfg.momentum_end))


@register("byol")
class BYOL(Method):
    paper_momentum = 0.996

    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg)
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim) if cfg.predictor else nn.Identity()
        self.target_backbone, self.target_projector = frozen_copy(backbone), frozen_copy(self.projector)
        self.momentum = self.base_momentum

    def forward(self, views, labels=None):
        z = self.encode(views[:2], self.backbone, self.projector)
        p_a, p_b = self.predictor(z).chunk(2)
        with torch.no_grad():
            t_a, t_b = self.encode(views[:2], self.target_backbone, self.target_projector).chunk(2)
        return {"loss": byol_loss(p_a, t_b) + byol_loss(p_b, t_a), "embedding": z.chunk(2)[0]}

    def after_step(self, step, total_steps):
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum, self.cfg.momentum_end)
        ema_update_(self.target_backbone, self.backbone, self.momentum)
        ema_update_(self.target_projector, self.projector, self.momentum)


@register("simsiam")
class SimSiam(Method):
    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg)
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_dim, last_bn=True)
        bottleneck = max(cfg.proj_dim // 4, 1)  # the paper's 2048 -> 512 -> 2048 predictor
        self.predictor = mlp(cfg.proj_dim, bottleneck, cfg.proj_dim) if cfg.predictor else nn.Identity()

    def forward(self, views, labels=None):
        z = self.encode(views[:2], self.backbone, self.projector)
        z_a, z_b = z.chunk(2)
        p_a, p_b = self.predictor(z).chunk(2)
        return {"loss": (simsiam_loss(p_a, z_b) + simsiam_loss(p_b, z_a)) / 2, "embedding": z_a}


@register("barlow_twins")
class BarlowTwins(Method):
    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg)
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_dim, layers=3)

    def forward(self, views, labels=None):
        z_a, z_b = self.encode(views[:2], self.backbone, self.projector).chunk(2)
        return {"loss": barlow_twins_loss(z_a, z_b, self.cfg.barlow_lambda), "embedding": z_a}


@register("swav")
class SwAV(Method):
    """Two global crops coded by Sinkhorn-Knopp, predicted from every other crop (multi-crop). With
    ``swav_queue``, earlier global-crop embeddings join the batch in Sinkhorn-Knopp (the paper's
    queue for small batches): equipartition over K prototypes needs many more than K rows."""

    default_temperature = 0.1

    def __init__(self, backbone, dim, cfg):
        super().__init__(backbone, dim, cfg)
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_dim)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.prototypes, bias=False)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # for the prototype freeze
        # One queue per global crop, as in the paper; the rows queued so far tell when they are all
        # real. Without a queue the state is as before it existed, so older checkpoints still load.
        self.queues = nn.ModuleList([KeyQueue(cfg.swav_queue, cfg.proj_dim) for _ in range(2)] if cfg.swav_queue else [])
        if cfg.swav_queue:
            self.register_buffer("queued", torch.zeros((), dtype=torch.long))

    def forward(self, views, labels=None):
        # Unit prototypes, normalised in the graph rather than in place: under ZeRO the optimizer
        # writes its fp32 masters back over the weights, so an in-place normalisation would not last.
        weight = self.prototypes.weight
        if int(self.steps_done) < self.cfg.freeze_prototypes_steps:
            weight = weight.detach()
        prototypes = F.normalize(weight, dim=-1)
        z_global = F.normalize(self.encode(views[:2], self.backbone, self.projector), dim=-1)
        groups = [z_global] + ([F.normalize(self.encode(views[2:], self.backbone, self.projector), dim=-1)]
                               if len(views) > 2 else [])
        scores = [s for z in groups for s in F.linear(z, prototypes).chunk(len(z) // views[0].shape[0])]
        codes = self.codes(scores[:2], z_global.chunk(2), prototypes)
        return {"loss": swav_loss(scores, codes, self.temperature), "embedding": z_global.chunk(2)[0]}

    @torch.no_grad()
    def codes(self, scores: list[torch.Tensor], z: tuple[torch.Tensor, ...], prototypes: torch.Tensor) -> list[torch.Tensor]:
        """Sinkhorn codes ``[B, K]`` of each global crop's scores; then this batch's embeddings ``z``
        are queued (from ``swav_queue_start_steps`` on)."""
        eps, iters = self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iters
        if not self.queues:
            return [sinkhorn(s, eps, iters) for s in scores]
        size = self.cfg.swav_queue
        mine = size // distributed.world_size()  # the same row count on every rank, as sinkhorn assumes
        start = distributed.rank() * mine
        rows, codes = len(scores[0]), []
        use_queue = mine > 0 and int(self.queued) >= size  # one host read for both crops
        for s, queue in zip(scores, self.queues):
            if use_queue:
                s = torch.cat([F.linear(queue.keys[start : start + mine].to(s.dtype), prototypes), s])
            codes.append(sinkhorn(s, eps, iters)[-rows:])
        if int(self.steps_done) >= self.cfg.swav_queue_start_steps:
            for z_g, queue in zip(z, self.queues):
                queue.enqueue(distributed.all_gather(z_g.detach().float()))
            self.queued += len(z[0]) * distributed.world_size()
        return codes

    def after_step(self, step, total_steps):
        self.steps_done.fill_(step)


def build_method(name: str, backbone: nn.Module, dim: int, cfg: MethodConfig) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](backbone, dim, cfg)
