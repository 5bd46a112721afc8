"""The CLIP trainer, retargeted at an image-only method: same engine, data, checkpoints, metrics.

Only what differs is overridden: the model (a ``Method``), the transform (multi-view), the step
(momentum updates after the optimizer step), the recorded metrics (collapse monitor) and the
evaluation (kNN and linear probe instead of zero-shot) and export (the backbone alone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from data.files import atomic_write
from training import distributed
from training.config import Config
from training.errors import CollectiveError
from training.export import write_safetensors
from training.model_config import image_side
from training.trainer import Trainer
from training.unimodal.evaluate import check_label_key, collapse_stats, evaluate_backbone, is_collapsed
from training.unimodal.methods import METHODS, Method, build_method
from training.unimodal.parts import create_backbone, ema_masters, restore_ema_masters, split_views
from training.unimodal.transforms import MultiView, eval_transform, recipes

log = logging.getLogger(__name__)


def build(cfg: Config, model_cfg: dict[str, Any]) -> Method:
    """The configured method around the model config's image tower (seeded: same on every rank)."""
    torch.manual_seed(cfg.train.seed)
    backbone, dim = create_backbone(model_cfg)
    return build_method(cfg.method.name, backbone, dim, cfg.method)


def crop_size(cfg: Config, model_cfg: dict[str, Any]) -> int:
    return cfg.method.image_size or image_side(model_cfg)


def label_tensor(metas: list[dict], key: str) -> torch.Tensor:
    """Integer labels from the samples' metadata (-1: none): a stable 63-bit hash of the name, so every
    rank agrees without a vocabulary; at 32 bits, two of 21k class names would share one 5% of the time."""
    def hashed(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1

    return torch.tensor([hashed(str(m[key])) if key in m else -1 for m in metas], dtype=torch.long)


def check_method_layout(cfg: Config, world: int) -> None:
    """The settings that depend on the number of processes: every rank finds the same."""
    m, global_batch = cfg.method, cfg.data.batch_size * world
    kind = METHODS[m.name]
    base = m.momentum if m.momentum >= 0 else kind.paper_momentum  # nan: no target network
    if m.name in ("byol", "moco_v3") and m.momentum_end < base:
        raise CollectiveError(f"method.momentum_end {m.momentum_end} is below {m.name}'s base momentum {base}: the "
                              "cosine schedule rises from it to momentum_end")
    if m.temperature and kind.default_temperature is None and distributed.is_main():
        log.warning("method.temperature %s has no effect: %s's loss has no softmax temperature", m.temperature,
                    m.name)
    if m.name == "swav" and m.swav_queue % world:
        raise CollectiveError(f"method.swav_queue {m.swav_queue} must be a multiple of the {world} processes: each "
                              "scores an equal share of the queue (0: none)")
    if m.name == "barlow_twins" and global_batch < 2:
        raise CollectiveError("barlow_twins standardises each dimension over the global batch: it needs at least 2 "
                              f"samples, and data.batch_size {cfg.data.batch_size} x {world} process(es) is 1")
    if m.name == "moco" and m.queue_size < 2 * global_batch and distributed.is_main():
        log.warning("method.queue_size %d holds less than one step's keys (2 views x global batch %d): each step "
                    "keeps only its newest %d", m.queue_size, global_batch, m.queue_size)


class UnimodalTrainer(Trainer):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_method_layout(cfg, distributed.world_size())
        m = cfg.method
        self.crop = crop_size(cfg, self.model_cfg)
        self.train_transform = MultiView(recipes(m.name, self.crop, m.crop_min_scale, m.small_crops))
        self.eval_transform = eval_transform(self.crop)
        self.view_shapes = self.train_transform.shapes
        self.image_size = None  # decode at full size; crops are taken from the original
        self.last_embedding: torch.Tensor | None = None
        self.collapse_warned = False
        self.unlabelled_warned = False

    def _make_model(self) -> Method:
        return build(self.cfg, self.model_cfg)

    def train_step(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step: the engine accumulates ``accum_steps`` micro-batches (plain
        accumulation: each micro-batch's negatives are its own global batch)."""
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        losses = []
        for batch in batches:
            views = split_views(batch["image"].to(self.device, dtype), self.view_shapes)
            labels = self._labels(batch["meta"]) if self.engine.module.needs_labels else None
            out = self.engine(views, labels)
            self.engine.backward(out["loss"])
            self.engine.step()
            losses.append(out["loss"].detach().float())
        self.engine.module.after_step(self.step + 1, self.cfg.train.steps)
        distributed.average_(self.norm_stats)
        self.last_embedding = out["embedding"].detach()
        return torch.stack(losses).mean()

    def _labels(self, metas: list[dict]) -> torch.Tensor:
        """Labels for a supervised method. A sample without the label is its own class (its other
        view is its one positive, as in SimCLR); a global batch with none at all is a mistake (a
        wrong ``method.label_key``), not something to train on."""
        key = self.cfg.method.label_key
        labels = label_tensor(metas, key)
        missing = labels < 0
        unlabelled = int(distributed.all_reduce_sum([float(missing.sum())])[0])
        everyone = len(labels) * distributed.world_size()  # every rank's batch is the same size
        if unlabelled == everyone:
            raise CollectiveError(f"{self.cfg.method.name} needs labels, and no sample of step {self.step + 1}'s "
                                  f"batch has '{key}' in its .json (method.label_key)")
        if unlabelled and not self.unlabelled_warned and distributed.is_main():
            log.warning("%d of %d samples at step %d have no '%s'; each is treated as its own class",
                        unlabelled, everyone, self.step + 1, key)
            self.unlabelled_warned = True
        first = distributed.rank() * len(labels)
        own = -1 - (first + torch.arange(len(labels)))  # negative, so never a hashed label
        return torch.where(missing, own, labels).to(self.device)

    def _checkpoint_state(self) -> dict[str, Any]:
        masters = ema_masters(self.engine.module)  # bf16 targets only: the same on every rank
        return {"ema_fp32": masters} if masters else {}

    def _restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        restore_ema_masters(self.engine.module, state.get("ema_fp32", {}))

    def _model_metrics(self) -> dict[str, float]:
        """Temperature, the collapse monitor and (for methods with a target network) the momentum."""
        temperature = self.engine.module.temperature  # BYOL, SimSiam and Barlow Twins have none
        fixed = {"temperature": temperature} if temperature is not None else {}
        stats = collapse_stats(distributed.all_gather(self.last_embedding))
        if math.isnan(stats["embedding_std"]):  # one row: no spread to measure
            return fixed
        collapsed = is_collapsed(stats, self.cfg.method.collapse_threshold)
        if collapsed and not self.collapse_warned and distributed.is_main():
            log.warning("collapse: embedding std %.3f (threshold %.3f), effective rank %.2f at step %d",
                        stats["embedding_std"], self.cfg.method.collapse_threshold, stats["effective_rank"], self.step)
        self.collapse_warned |= collapsed
        momentum = self.engine.module.momentum
        return {
            **fixed,
            **stats,
            "collapsed": int(collapsed),
            **({"momentum": momentum} if momentum == momentum else {}),  # nan: the method has no target
        }

    def fit(self) -> dict[str, float]:
        data = self.cfg.data
        if data.val_shards:  # the evaluations' labels (queries and bank), checked before the run trains for them
            for shards in (data.val_shards, data.train_shards):
                check_label_key(shards, self.cfg.method.label_key, self.eval_transform, self.s3)
        return super().fit()

    def evaluate(self) -> dict[str, float]:
        data, m = self.cfg.data, self.cfg.method
        if not data.val_shards:
            return {}
        result = evaluate_backbone(
            self.engine.module.backbone, train_shards=data.train_shards,
            test_shards=data.val_shards, transform=self.eval_transform, label_key=m.label_key,
            train_samples=m.eval_train_samples, knn_k=m.knn_k, knn_temperature=m.knn_temperature,
            linear_steps=m.linear_steps, device=self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32,
            s3=self.s3,
        )
        if distributed.is_main():
            with (self.run_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, **result}) + "\n")
            log.info("eval at step %d: kNN top-1 %.3f, linear top-1 %.3f", self.step, result["knn_top1"],
                     result["linear_top1"])
        return result

    def export(self) -> Path:
        """``export/backbone.safetensors`` (fp32) and the model config it was built from."""
        out = self.run_dir / "export"
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            write_safetensors(self._backbone_state(), out / "backbone.safetensors")  # each file whole, the config last
            atomic_write(out / "backbone.json", json.dumps({"method": self.cfg.method.name, "model_cfg": self.model_cfg,
                                                            "image_size": self.crop}, indent=2).encode())
            log.info("exported the %s backbone to %s", self.cfg.method.name, out)
        distributed.barrier()
        return out

    def _backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's weights in fp32. A bf16 module holds only bf16 copies, so its parameters
        come from the fp32 masters of the checkpoint ``fit`` has just saved (as the CLIP export's)."""
        state = self.engine.module.backbone.state_dict()
        if self.bf16:
            full = distributed.consolidated_state_dict(self.ckpt_dir, self._tag())
            masters = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
            state = {k: masters.get(k, v) for k, v in state.items()}
        return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def load_backbone(export_dir: Path) -> tuple[torch.nn.Module, int]:
    """The exported backbone (and its crop size), ready for ``evaluate_backbone``."""
    from safetensors.torch import load_file

    meta = json.loads((Path(export_dir) / "backbone.json").read_text())
    backbone, _ = create_backbone(meta["model_cfg"])
    backbone.load_state_dict(load_file(str(Path(export_dir) / "backbone.safetensors")))
    return backbone, meta["image_size"]
