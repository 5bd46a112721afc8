"""Fail fast on mistakes the user can fix, before any training process starts.

Imports neither torch nor open_clip nor webdataset: ``tandem train --nproc N`` runs these checks in
the launching process, so a missing shard or an unknown model is reported in about a second, and a
good launch does not pay the heavy imports once more before its workers pay them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from data.classes import load_classes
from data.s3 import S3Settings
from data.shards import check_remote, check_sizes, expand_shards, split_sources
from training.config import Config
from training.errors import UserError
from training.model_config import MODEL_CFG_FILE, image_side, resolve_model_config


def check_inputs(cfg: Config, resume: str | None = None) -> None:
    """Shards, weights, resume tag, model and classes: a ``UserError`` for the first one that is wrong."""
    cfg.validate()
    sources = split_sources(cfg.data.train_shards)
    weights = parse_weights(cfg.data.train_weights)
    if weights and len(weights) != len(sources):
        raise UserError(f"data.train_weights has {len(weights)} weights for {len(sources)} sources")
    s3 = s3_settings(cfg)
    train_urls = expand_shards(cfg.data.train_shards)
    check_remote(train_urls, s3)
    check_sizes(train_urls)
    if resume and resume != "latest" and not (Path(cfg.train.run_dir) / "checkpoints" / resume).is_dir():
        raise UserError(f"no checkpoint '{resume}' in {Path(cfg.train.run_dir) / 'checkpoints'}")
    check_view_sizes(cfg, resolve_model_config(cfg.model))
    check_writable_dir(cfg.train.run_dir, "train.run_dir")
    if cfg.data.val_shards:
        check_remote(expand_shards(cfg.data.val_shards), s3)
    if cfg.data.classes:
        load_classes(cfg.data.classes)


def check_view_sizes(cfg: Config, model_cfg: dict) -> None:
    """An image-only method crops views of ``method.image_size`` (SwAV also smaller ones). A timm
    tower pools any size; open_clip's own towers (ViT, ModifiedResNet) take only their configured size."""
    if cfg.method.name == "clip" or model_cfg["vision_cfg"].get("timm_model_name"):
        return
    size = image_side(model_cfg)
    if cfg.method.image_size not in (0, size):
        raise UserError(f"method.image_size {cfg.method.image_size}: model '{cfg.model.name}' has an open_clip image "
                        f"tower, which takes only {size} px images (set 0 or {size}, or use a timm tower)")
    if cfg.method.name == "swav" and cfg.method.small_crops:
        raise UserError(f"swav's small crops need a timm image tower; model '{cfg.model.name}' takes only {size} px "
                        "images: set method.small_crops=0")


def checkpoint_folders(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first: a checkpoint folder takes its ``step*``
    name only once written whole (``distributed.save_checkpoint``)."""
    return sorted(p for p in Path(directory).glob("step*") if p.is_dir())


def check_run_start(run_dir: Path, resume: str | None) -> None:
    """A start without ``--resume`` must not train over a run's checkpoints: its logs, config and
    ``latest`` would mix with the old run's, and pruning would count the old run's checkpoints."""
    folders = checkpoint_folders(Path(run_dir) / "checkpoints")
    if not resume and folders:
        raise UserError(f"train.run_dir {run_dir} holds a run's checkpoints (newest {folders[-1].name}): resume it "
                        "with --resume latest, or train into a new train.run_dir")


def check_writable_dir(path: str | Path, what: str) -> None:
    """An output folder (``what`` names its flag or key) is a folder, or can be made one: not a file,
    under a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be written: {existing} is not a writable folder")


def check_run_dir(run_dir: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """``tandem export --run``: a run directory holding checkpoint ``tag`` (default: the latest).

    Returns the checkpoint folder and the tag."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_CFG_FILE).is_file():
        raise UserError(f"{run_dir} is not a Tandem run directory (no {MODEL_CFG_FILE})")
    checkpoint_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(checkpoint_dir)
    if not (checkpoint_dir / tag).is_dir():
        raise UserError(f"no checkpoint '{tag}' in {checkpoint_dir}")
    if not any((checkpoint_dir / tag).glob("*model_states.pt")):
        raise UserError(f"{checkpoint_dir / tag} holds no model states (*model_states.pt): not a checkpoint "
                        "written by tandem train")
    return checkpoint_dir, tag


def latest_tag(checkpoint_dir: Path) -> str:
    """The tag DeepSpeed's ``latest`` file names."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise UserError(f"no checkpoint found in {checkpoint_dir}")
    return latest.read_text().strip()


def parse_weights(text: str) -> list[float]:
    """``data.train_weights``: sampling weights of the ``::``-separated sources."""
    try:
        weights = [float(w) for w in text.split("::") if w.strip()]
    except ValueError:
        raise UserError(f"data.train_weights must be numbers separated by '::', got '{text}'") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or (weights and sum(weights) <= 0):
        raise UserError("data.train_weights must be finite, non-negative and with a positive sum")
    return weights


def s3_settings(cfg: Config) -> S3Settings:
    data = cfg.data
    return S3Settings(endpoint_url=data.s3_endpoint_url, region=data.s3_region,
                      access_key_id=data.s3_access_key_id, secret_access_key=data.s3_secret_access_key,
                      retry_seconds=data.s3_retry_seconds)
