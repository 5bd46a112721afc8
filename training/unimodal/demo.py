"""``tandem demo --method M``: synthetic shards -> DeepSpeed training of an image-only method ->
kNN and linear-probe evaluation of the trained and of the untrained backbone (as initialised, and
with its BatchNorm statistics recomputed on the training images) -> ``eval.json``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from training.demo import train_on_synthetic

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def method_config(method: str) -> Path:
    """``training/configs/<method>.toml``: the method's demo settings (also a `tandem train` config)."""
    return CONFIG_DIR / f"{method}.toml"


def run_method_demo(out: Path, method: str, *, nproc: int, train_samples: int, test_samples: int,
                    overrides: list[str], framing: str) -> int:
    from training.model_config import resolve_model_config
    from training.unimodal.evaluate import evaluate_backbone, recompute_batchnorm_stats
    from training.unimodal.trainer import build, crop_size, load_backbone
    from training.unimodal.transforms import eval_transform

    start = time.time()
    out = Path(out).resolve()
    cfg, run_dir, status, trained_s = train_on_synthetic(
        out, method_config(method), nproc=nproc, train_samples=train_samples, test_samples=test_samples,
        overrides=overrides, framing=framing, method=method)
    if status != 0:
        return status

    # Both backbones through one protocol, in this process: the trained export, and the same
    # architecture with the same seeded initial weights the run started from.
    # Half the cores: the decoding loader runs beside the model, and spinning OpenMP threads on an
    # oversubscribed CPU cost more than they bring (2.5x slower measured on a shared 2-core box).
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model_cfg = resolve_model_config(cfg.model)
    m = cfg.method
    protocol = dict(train_shards=cfg.data.train_shards, test_shards=cfg.data.val_shards,
                    transform=eval_transform(crop_size(cfg, model_cfg)), label_key=m.label_key,
                    train_samples=m.eval_train_samples, knn_k=m.knn_k, knn_temperature=m.knn_temperature,
                    linear_steps=m.linear_steps)
    trained = evaluate_backbone(load_backbone(run_dir / "export")[0], **protocol)
    initial = build(cfg, model_cfg).backbone
    untrained = evaluate_backbone(initial, **protocol)
    # The untrained backbone again, its BatchNorm statistics recomputed on the training images:
    # what the data's statistics alone give, with no weight learned.
    recalibrated = evaluate_backbone(recompute_batchnorm_stats(
        initial, cfg.data.train_shards, protocol["transform"], samples=m.eval_train_samples), **protocol)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    result = {
        "method": method,
        "knn_top1": trained["knn_top1"],
        "linear_top1": trained["linear_top1"],
        "knn_top1_random_init": untrained["knn_top1"],
        "linear_top1_random_init": untrained["linear_top1"],
        "knn_top1_random_init_precise_bn": recalibrated["knn_top1"],
        "linear_top1_random_init_precise_bn": recalibrated["linear_top1"],
        "num_samples": trained["num_samples"],
        "num_train_samples": trained["num_train_samples"],
        "label": m.label_key,
        "steps": cfg.train.steps,
        "global_batch": cfg.data.batch_size * nproc,
        "train_seconds": round(trained_s, 1),
        "total_seconds": round(time.time() - start, 1),
        "final_loss": last["loss"],
        "embedding_std": last.get("embedding_std"),
        "effective_rank": last.get("effective_rank"),
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    _report(out, run_dir, result)
    return 0


def _report(out: Path, run_dir: Path, r: dict) -> None:
    print(f"\n{r['method']}: {r['steps']} steps in {r['train_seconds']:.0f}s ({r['total_seconds']:.0f}s in all); "
          f"label '{r['label']}', {r['num_samples']} held-out samples")
    print(f"  {'':14s} {'trained':>8s} {'random init':>12s} {'random init, precise BN':>24s}")
    for key in ("knn_top1", "linear_top1"):
        print(f"  {key:14s} {r[key]:8.3f} {r[key + '_random_init']:12.3f} {r[key + '_random_init_precise_bn']:24.3f}")
    print("  (precise BN: the untrained weights with BatchNorm statistics recomputed on the training images)")
    if r["embedding_std"] is not None:  # none when the last logged batch had a single row
        print(f"  collapse monitor: embedding std {r['embedding_std']:.3f}, effective rank {r['effective_rank']:.1f}")
    print(f"\n  run          {run_dir}  (config.toml, metrics.jsonl, eval.jsonl, checkpoints/, export/)")
    print(f"  eval.json    {out / 'eval.json'}")
