"""Zero-shot classification and image<->text retrieval on a held-out split.

Shape legend: n = evaluated samples, C = classes, T = templates, D = embed dim.

Every rank embeds its own share of the split and the features are gathered, so evaluation costs
1/world of the single-process time and no rank idles while rank 0 works.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from data.classes import load_classes
from data.pipeline import StreamSpec, make_loader
from data.shards import expand_shards
from training import distributed

RECALL_AT = (1, 5, 10)


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
            labels.extend(m.get("class") for m in batch["meta"])
    return {
        "image": torch.cat(images).numpy() if images else np.zeros((0, dim), np.float32),
        "text": torch.cat(texts).numpy() if texts else np.zeros((0, dim), np.float32),
        "labels": labels,
    }


def recall_at(query: torch.Tensor, keys: torch.Tensor, ks=RECALL_AT, chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries whose paired key (same row index) ranks in the top k, in row chunks."""
    hits = {k: 0 for k in ks}
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ keys.T
        rows = torch.arange(sims.shape[0])
        positive = sims[rows, rows + start]
        rank = (sims > positive[:, None]).sum(1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    n = max(query.shape[0], 1)
    return {k: hits[k] / n for k in ks}


def compute_metrics(image: torch.Tensor, text: torch.Tensor, labels: list[str], classes: list[str],
                    classifier: torch.Tensor) -> dict[str, float]:
    """Zero-shot top-1/top-5 and both retrieval directions' recall@1/5/10."""
    index = {name: i for i, name in enumerate(classes)}
    known = [i for i, label in enumerate(labels) if label in index]
    target = torch.tensor([index[labels[i]] for i in known], dtype=torch.long)
    logits = image[known] @ classifier.T
    top5 = logits.topk(min(5, len(classes)), dim=1).indices
    result = {
        "zero_shot_top1": float((top5[:, 0] == target).float().mean()) if known else 0.0,
        "zero_shot_top5": float((top5 == target[:, None]).any(1).float().mean()) if known else 0.0,
    }
    for k, value in recall_at(image, text).items():
        result[f"image_to_text_recall@{k}"] = value
    for k, value in recall_at(text, image).items():
        result[f"text_to_image_recall@{k}"] = value
    result["num_samples"] = int(image.shape[0])
    return result


def evaluate(model, tokenizer: Callable, eval_transform: Callable, *, shards: str, classes_path: str,
             image_size: int, batch_size: int = 256, device=None, dtype=torch.float32) -> dict[str, float]:
    """Evaluate ``model`` (an open_clip module, possibly inside a DeepSpeed engine) on ``shards``."""
    device = device or distributed.device()
    model.to(device)  # a no-op for the training run's own module; an export loads on the CPU
    classes, templates = load_classes(classes_path)
    spec = StreamSpec(urls=expand_shards(shards), batch_size=batch_size, rank=distributed.rank(),
                      world=distributed.world_size(), workers=1, train=False)
    loader = make_loader(spec, eval_transform, tokenizer, image_size, in_process=True)
    context = tokenizer(["x"]).shape[-1]
    dummy = {"image": torch.zeros(1, 3, image_size, image_size), "text": torch.zeros(1, context, dtype=torch.long)}
    was_training = model.training
    model.eval()
    try:
        classifier = class_embeddings(model, tokenizer, classes, templates, device).cpu()
        local = embed_split(model, loader, device, dtype, dummy, classifier.shape[1])
    finally:
        model.train(was_training)
    parts = distributed.all_gather_object(local)
    image = torch.from_numpy(np.concatenate([p["image"] for p in parts]))
    text = torch.from_numpy(np.concatenate([p["text"] for p in parts]))
    labels = [label for p in parts for label in p["labels"]]
    return compute_metrics(image, text, labels, classes, classifier)


def evaluate_export(model_dir: str, shards: str, classes_path: str, *, batch_size: int = 256) -> dict[str, float]:
    """Evaluate an export exactly as a user of open_clip would load it (``local-dir:``)."""
    import open_clip

    from training.checks import check_export_dir

    path = check_export_dir(model_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tok = open_clip.get_tokenizer(f"local-dir:{path}")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return evaluate(model, tok, preprocess, shards=shards, classes_path=classes_path, image_size=image_size,
                    batch_size=batch_size, device=distributed.device())
