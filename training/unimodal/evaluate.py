"""Frozen-backbone evaluation (weighted kNN, linear probe) and the collapse monitor.

Shape legend: n = train-bank samples, m = test samples, F = backbone features, C = classes,
D = embed dim.

Labels come from a key of each sample's ``.json`` sidecar (``shape`` on the synthetic shards,
since colour jitter makes these methods colour-invariant by design).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from data.pipeline import StreamSpec, make_loader
from data.s3 import S3Settings
from data.shards import expand_shards
from training import distributed


@torch.no_grad()
def embed_images(backbone: torch.nn.Module, shards: str, transform: Callable, *, label_key: str,
                 max_samples: int = 0, batch_size: int = 256, device=None,
                 dtype=torch.float32, s3: S3Settings = S3Settings()) -> tuple[torch.Tensor, list[str]]:
    """Backbone features ``[n, F]`` and labels of (up to ``max_samples`` of) ``shards``.

    Every rank embeds its own share and the results are gathered. Samples without ``label_key``
    are dropped. No forward is a collective, so ranks may hold different numbers of batches.
    """
    device = device or distributed.device()
    backbone.to(device)  # a no-op for the training run's own module; an export loads on the CPU
    world = distributed.world_size()
    loader = _loader(shards, transform, batch_size, s3)
    quota = math.ceil(max_samples / world) if max_samples else None
    features, labels = [], []
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in loader:
            keep = [i for i, meta in enumerate(batch["meta"]) if label_key in meta]
            if keep:
                out = backbone(batch["image"][keep].to(device, dtype)).float().cpu()
                features.append(out)
                labels += [str(batch["meta"][i][label_key]) for i in keep]
            if quota and len(labels) >= quota:
                break
    finally:
        backbone.train(was_training)
    local = torch.cat(features)[:quota] if features else torch.zeros(0, 0)
    parts = distributed.all_gather_object((local.numpy(), labels[:quota] if quota else labels))
    kept = [p[0] for p in parts if len(p[1])]
    feats = torch.from_numpy(np.concatenate(kept)) if kept else torch.zeros(0, 0)
    return feats, [label for p in parts for label in p[1]]


@torch.no_grad()
def recompute_batchnorm_stats(backbone: torch.nn.Module, shards: str, transform: Callable, *, samples: int,
                              batch_size: int = 256, device=None, dtype=torch.float32,
                              s3: S3Settings = S3Settings()) -> torch.nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics are the exact averages of the batch
    statistics over (this rank's share of) up to ``samples`` images of ``shards`` seen through
    ``transform`` ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"); weights untouched.

    An untrained backbone's running statistics are the initial mean 0 and variance 1, far from what
    its layers see, so its eval-mode features are a weak baseline. Recomputed, the baseline shows what
    the data's statistics alone give, and what a trained backbone scores beyond it was learned.
    """
    device = device or distributed.device()
    recalibrated = copy.deepcopy(backbone).to(device)
    norms = [m for m in recalibrated.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    recalibrated.train()
    seen = 0
    for batch in _loader(shards, transform, batch_size, s3):
        if seen >= samples:
            break
        images = batch["image"][: samples - seen]
        recalibrated(images.to(device, dtype))
        seen += len(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return recalibrated.eval()


def check_label_key(shards: str, label_key: str, transform: Callable, s3: S3Settings = S3Settings(),
                    samples: int = 16) -> None:
    """The first ``samples`` samples of ``shards``' first shard carry ``label_key`` in their ``.json``,
    some of them at least: a wrong key is one line before training, not after it (every rank reads
    the same samples, so every rank stops alike)."""
    from training.errors import CollectiveError

    first = expand_shards(shards)[:1]
    spec = StreamSpec(urls=first, batch_size=samples, rank=0, world=1, workers=1, train=False, s3=s3)
    stream = iter(make_loader(spec, transform, _no_text, None, in_process=True))
    try:
        batch = next(stream, None)
    finally:
        getattr(stream, "close", lambda: None)()  # the shard's open stream with it
    metas = batch["meta"] if batch is not None else []
    if not any(label_key in meta for meta in metas):
        found = sorted({key for meta in metas for key in meta})
        raise CollectiveError(f"no sample of the first {len(metas)} in {first[0]} has '{label_key}' in its .json "
                              f"(method.label_key; the keys there: {', '.join(found) or 'none'})")


def _loader(shards: str, transform: Callable, batch_size: int, s3: S3Settings):
    """This rank's share of ``shards`` in order, once, as ``{"image": [b, 3, H, W], "meta": ...}`` batches."""
    spec = StreamSpec(urls=expand_shards(shards), batch_size=batch_size, rank=distributed.rank(),
                      world=distributed.world_size(), workers=1, train=False, s3=s3)
    return make_loader(spec, transform, _no_text, None, in_process=True)


def _no_text(captions: list[str]) -> torch.Tensor:
    return torch.zeros(len(captions), 1, dtype=torch.long)


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             *, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Weighted kNN accuracy (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination"): cosine neighbours vote for their class with ``exp(sim / t)``."""
    train, test = F.normalize(train.float(), dim=-1), F.normalize(test.float(), dim=-1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)  # [c, k]
        # Each row's weights relative to its nearest neighbour: the same vote, and no overflow to inf
        # (exp(sim / t) passes float32's range for t below about 0.0113).
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(sims.shape[0], classes).scatter_add_(1, train_labels[idx], weights)
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return correct / max(test.shape[0], 1)


def linear_probe_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                      test_labels: torch.Tensor, *, steps: int = 300, lr: float = 0.05,
                      weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Accuracy of a softmax classifier trained full-batch on frozen, standardised features."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, x_test = (train - mean) / std, (test - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(probe(x), train_labels).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe(x_test).argmax(1) == test_labels).float().mean())


def label_ids(train_labels: list[str], test_labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    names = {name: i for i, name in enumerate(sorted(set(train_labels) | set(test_labels)))}
    return (torch.tensor([names[n] for n in train_labels], dtype=torch.long),
            torch.tensor([names[n] for n in test_labels], dtype=torch.long))


def evaluate_backbone(backbone: torch.nn.Module, *, train_shards: str, test_shards: str, transform: Callable,
                      label_key: str, train_samples: int, knn_k: int = 200, knn_temperature: float = 0.1,
                      linear_steps: int = 300, device=None, dtype=torch.float32,
                      s3: S3Settings = S3Settings()) -> dict[str, float]:
    """kNN and linear-probe top-1 of frozen ``backbone`` features: bank/probe fit on up to
    ``train_samples`` of ``train_shards``, scored on all of ``test_shards``."""
    common = dict(label_key=label_key, device=device, dtype=dtype, s3=s3)
    train, train_names = embed_images(backbone, train_shards, transform, max_samples=train_samples, **common)
    test, test_names = embed_images(backbone, test_shards, transform, **common)
    if not train_names or not test_names:
        from training.errors import UserError

        raise UserError(f"no samples with the label '{label_key}' in their .json to evaluate on")
    train_y, test_y = label_ids(train_names, test_names)
    return {
        "knn_top1": knn_top1(train, train_y, test, test_y, k=knn_k, temperature=knn_temperature),
        "linear_top1": linear_probe_top1(train, train_y, test, test_y, steps=linear_steps),
        "num_samples": len(test_names),
        "num_train_samples": len(train_names),
    }


def collapse_stats(embedding: torch.Tensor) -> dict[str, float]:
    """Collapse monitor on ``[n, D]`` embeddings.

    ``embedding_std``: the per-dimension std of the L2-normalised embeddings, averaged over
    dimensions and multiplied by sqrt(D): about 1 for embeddings spread over the sphere, 0 when all
    collapse to one point (the BYOL/SimSiam failure mode; SimSiam paper, Fig. 2); NaN for a single
    row, whose spread is undefined.
    ``effective_rank``: exp of the entropy of the normalised singular values (RankMe, Garrido et
    al. 2023), from 1 (one direction) to min(n, D).
    """
    z = F.normalize(embedding.detach().float(), dim=-1)
    dim = z.shape[1]
    std = float(z.std(0).mean()) * math.sqrt(dim) if z.shape[0] > 1 else float("nan")
    sigma = torch.linalg.svdvals(z)
    p = sigma / sigma.sum().clamp_min(1e-12) + 1e-12
    return {"embedding_std": std, "effective_rank": float((-(p * p.log()).sum()).exp())}


def is_collapsed(stats: dict[str, float], threshold: float) -> bool:
    return stats["embedding_std"] < threshold
