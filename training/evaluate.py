"""Zero-shot classification and image<->text retrieval on a held-out split.

Retrieval needs only image-caption pairs. Zero-shot needs a ``classes.json`` and a label per sample: the
``class`` field of its ``.json`` sidecar; without them the zero-shot figures are left out, not zero.

Shape legend: n = evaluated samples, C = classes, T = templates, D = embed dim.

Every rank embeds its own share of the split and the features are gathered, so evaluation costs
1/world of the single-process time and no rank idles while rank 0 works.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from data.classes import LABEL_KEY, load_classes
from data.pipeline import StreamSpec, make_loader
from data.s3 import S3Settings
from data.shards import expand_shards
from training import distributed

RECALL_AT = (1, 5, 10)
log = logging.getLogger(__name__)


@torch.no_grad()
def class_embeddings(model, tokenizer: Callable, classes: list[str], templates: list[str], device) -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of its normalised template embeddings."""
    rows = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def embed_split(model, loader, device, dtype: torch.dtype, dummy: dict[str, torch.Tensor], dim: int) -> dict[str, Any]:
    """This rank's image and caption embeddings and class names.

    Ranks may hold different numbers of batches, and under ZeRO-3 every forward is a collective, so
    each iteration first agrees whether any rank still has data; a rank that ran out embeds a
    dummy batch and drops the result.
    """
    images, texts, labels = [], [], []
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if distributed.all_reduce_max(int(batch is not None)) == 0:
            break
        source = batch if batch is not None else dummy
        image = model.encode_image(source["image"].to(device, dtype))
        text = model.encode_text(source["text"].to(device))
        if batch is not None:
            images.append(F.normalize(image.float(), dim=-1).cpu())
            texts.append(F.normalize(text.float(), dim=-1).cpu())
            labels.extend(m.get(LABEL_KEY) for m in batch["meta"])
    return {
        "image": torch.cat(images).numpy() if images else np.zeros((0, dim), np.float32),
        "text": torch.cat(texts).numpy() if texts else np.zeros((0, dim), np.float32),
        "labels": labels,
    }


def recall_at(query: torch.Tensor, keys: torch.Tensor, ks=RECALL_AT, chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries whose paired key (same row index) ranks in the top k, in row chunks.

    A key scoring the same as the pair ranks ahead of it when its row comes first, so a collapsed
    model (every score equal) scores chance, k / n, not 1.0; a NaN score ranks ahead of everything,
    and a query whose own pair scores NaN is a miss.
    """
    hits = {k: 0 for k in ks}
    n = query.shape[0]
    columns = torch.arange(keys.shape[0])
    for start in range(0, n, chunk):
        sims = (query[start : start + chunk] @ keys.T).nan_to_num(nan=float("inf"))
        rows = torch.arange(sims.shape[0])
        own = rows + start
        positive = sims[rows, own][:, None]
        rank = (sims > positive).sum(1) + ((sims == positive) & (columns[None] < own[:, None])).sum(1)
        rank[~torch.isfinite(positive[:, 0])] = keys.shape[0]
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / max(n, 1) for k in ks}


def compute_metrics(image: torch.Tensor, text: torch.Tensor, labels: list[str | None], classes: list[str],
                    classifier: torch.Tensor | None) -> dict[str, float]:
    """Both retrieval directions' recall@1/5/10, and zero-shot top-1/top-5 over the samples whose label
    is one of ``classes`` (``zero_shot_samples`` of them; the zero-shot keys are absent when none is)."""
    result: dict[str, float] = {}
    index = {name: i for i, name in enumerate(classes)}
    known = [i for i, label in enumerate(labels) if label in index]
    if classifier is not None and known:
        target = torch.tensor([index[labels[i]] for i in known], dtype=torch.long)
        top5 = (image[known] @ classifier.T).topk(min(5, len(classes)), dim=1).indices
        result["zero_shot_top1"] = float((top5[:, 0] == target).float().mean())
        result["zero_shot_top5"] = float((top5 == target[:, None]).any(1).float().mean())
    for k, value in recall_at(image, text).items():
        result[f"image_to_text_recall@{k}"] = value
    for k, value in recall_at(text, image).items():
        result[f"text_to_image_recall@{k}"] = value
    result["num_samples"] = int(image.shape[0])
    if classifier is not None:
        result["zero_shot_samples"] = len(known)
    return result


def evaluate(model, tokenizer: Callable, eval_transform: Callable, *, shards: str, classes_path: str | None,
             image_size: int, batch_size: int = 256, device=None, dtype=torch.float32,
             s3: S3Settings = S3Settings()) -> dict[str, float]:
    """Evaluate ``model`` (an open_clip module, possibly inside a DeepSpeed engine) on ``shards`` (read
    with ``s3``'s endpoint and keys when on S3); retrieval only when ``classes_path`` is empty."""
    device = device or distributed.device()
    model.to(device)  # a no-op for the training run's own module; an export loads on the CPU
    classes, templates = load_classes(classes_path) if classes_path else ([], [])
    spec = StreamSpec(urls=expand_shards(shards), batch_size=batch_size, rank=distributed.rank(),
                      world=distributed.world_size(), workers=1, train=False, s3=s3)
    loader = make_loader(spec, eval_transform, tokenizer, image_size, in_process=True)
    context = tokenizer(["x"]).shape[-1]
    dummy = {"image": torch.zeros(1, 3, image_size, image_size), "text": torch.zeros(1, context, dtype=torch.long)}
    was_training = model.training
    model.eval()
    try:
        if classes:
            classifier = class_embeddings(model, tokenizer, classes, templates, device).cpu()
            dim = classifier.shape[1]
        else:  # every rank runs this forward, so it is safe under ZeRO-3 too
            classifier, dim = None, model.encode_text(dummy["text"].to(device)).shape[-1]
        local = embed_split(model, loader, device, dtype, dummy, dim)
    finally:
        model.train(was_training)
    parts = distributed.all_gather_object(local)
    image = torch.from_numpy(np.concatenate([p["image"] for p in parts]))
    text = torch.from_numpy(np.concatenate([p["text"] for p in parts]))
    labels = [label for p in parts for label in p["labels"]]
    result = compute_metrics(image, text, labels, classes, classifier)
    if classes and not result["zero_shot_samples"] and distributed.is_main():
        log.warning("no sample of %s has a %r in its .json sidecar that names a class of %s: zero-shot "
                    "is left out", shards, LABEL_KEY, classes_path)
    return result


def evaluate_export(model_dir: str, shards: str, classes_path: str | None, *, batch_size: int = 256) -> dict[str, float]:
    """Evaluate an export exactly as a user of open_clip would load it (``local-dir:``)."""
    import open_clip

    from training.model_config import check_export_dir

    path = check_export_dir(model_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tok = open_clip.get_tokenizer(f"local-dir:{path}")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return evaluate(model, tok, preprocess, shards=shards, classes_path=classes_path, image_size=image_size,
                    batch_size=batch_size, device=distributed.device())
