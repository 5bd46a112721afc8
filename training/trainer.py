"""The CLIP training loop on a DeepSpeed engine.

Shape legend: B = micro-batch per rank, W = world size.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.pipeline import StreamSpec, make_loader
from data.shards import count_samples, expand_shards, split_sources
from training import distributed
from training.checks import checkpoint_folders, parse_weights, s3_settings
from training.config import Config, LossConfig, to_toml
from training.errors import CollectiveError
from training.evaluate import evaluate
from training.export import export_checkpoint, write_run_model_config
from training.grad_cache import grad_cache_step
from training.losses import clip_loss, siglip_loss
from training.metrics import MetricsLogger, Throughput, drop_records_after
from training.model import create_model, init_logit_scale, preprocess_config, tokenizer, transforms
from training.model_config import resolve_model_config
from training.optim import build_optimizer, cosine_schedule

log = logging.getLogger(__name__)


# Per-group optimizer settings that come from the config (``build_optimizer``), not the checkpoint.
_OPTIM_SETTINGS = ("lr", "betas", "eps", "weight_decay", "max_value")


@dataclass
class DataCursor:
    """Where each of this rank's loader roles stands; restored on resume for the exact sequence."""

    world: int
    workers: int
    seed: int
    positions: dict[int, int | dict] = field(default_factory=dict)
    """Per role: its last batch's ``resume`` state (a plain count in checkpoints of older versions)."""
    consumed: int = 0
    """Batches this rank has taken from the loader (one per micro-step)."""
    start_epoch: int = 0
    """The epoch the loader's streams began with (the cursor replays from there)."""
    epoch: int = 0
    """Newest epoch any of this rank's batches came from."""

    def advance(self, batch: dict[str, Any]) -> None:
        self.positions[int(batch["role"])] = batch["resume"]
        self.consumed += 1
        self.epoch = max(self.epoch, int(batch["epoch"]))

    def state(self) -> dict[str, Any]:
        """Every rank's cursor, for the checkpoint (a collective: all ranks call it)."""
        mine = {"positions": {str(k): v for k, v in self.positions.items()}, "consumed": self.consumed}
        ranks = distributed.all_gather_object(mine)
        epoch = max(distributed.all_gather_object(self.epoch))
        return {"world": self.world, "workers": self.workers, "seed": self.seed, "start_epoch": self.start_epoch,
                "epoch": epoch, "ranks": ranks}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue exactly where the checkpoint's stream stood, or at the next epoch if the layout changed.

        World size, workers and seed are compared here. The rest of the layout (``data.shuffle_buffer``
        and a fingerprint of each source's shard list) the loader saves in each role's ``resume`` state
        and compares itself, since only it knows the current one; a role whose layout changed starts
        at ``restart_epoch``, added here: one past the newest epoch of any rank, so that every role of
        every rank starts the same epoch, as they do when the world changed.
        """
        if (saved.get("world"), saved.get("workers"), saved.get("seed")) == (self.world, self.workers, self.seed):
            mine = saved["ranks"][distributed.rank()]
            restart = int(saved["epoch"]) + 1
            self.positions = {int(k): {**v, "restart_epoch": restart} if isinstance(v, dict) else v
                              for k, v in mine["positions"].items()}
            self.consumed, self.start_epoch = mine["consumed"], saved["start_epoch"]
            self.epoch = saved["epoch"]
            return
        self.start_epoch = self.epoch = int(saved.get("epoch", -1)) + 1
        if distributed.is_main():
            log.warning("world size, workers or seed changed since the checkpoint: data resumes at the start of "
                        "epoch %d (the rest of the interrupted epoch is skipped, no sample repeats within an epoch)",
                        self.start_epoch)


def contrastive_loss(cfg: LossConfig, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's share of the configured loss for a model output, in fp32 whatever the precision."""
    features = out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()
    if cfg.impl == "siglip":
        return siglip_loss(*features, out["logit_bias"].float(), tile_size=cfg.tile_size)
    return clip_loss(*features, impl=cfg.impl, tile_size=cfg.tile_size)


def _precision(cfg: Config) -> bool:
    """True for bf16 (the default on GPU)."""
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model_cfg = resolve_model_config(cfg.model)
        if cfg.loss.impl == "siglip":  # open_clip then gives the model its learnable logit_bias
            self.model_cfg["init_logit_bias"] = cfg.loss.init_logit_bias
        self.preprocess_cfg = preprocess_config(self.model_cfg)
        self.image_size = self.model_cfg["vision_cfg"]["image_size"]
        self.train_transform, self.eval_transform = transforms(self.preprocess_cfg)
        self.tokenizer = tokenizer(self.model_cfg)
        self.bf16 = _precision(cfg)
        self.s3 = s3_settings(cfg)  # the store settings every read of shards uses
        self.device = distributed.device()
        self.step = 0
        self.skipped = 0  # corrupt or incomplete samples, all ranks, since the run began (kept in its checkpoints)
        self.unreported_skips = 0  # this rank's, since the last log line
        self.superseded: set[str] = set()
        """Checkpoints newer than the one resumed, left by the run this one took over from; each
        leaves the set when this run saves at its step."""
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        """On the device: every loss of this rank since the run (re)started was finite."""
        self.cursor = DataCursor(distributed.world_size(), max(1, cfg.data.workers), cfg.train.seed)

    def _write_run_files(self) -> None:
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
            write_run_model_config(self.run_dir, self.model_cfg, self.preprocess_cfg)
        distributed.barrier()

    def _make_model(self) -> torch.nn.Module:
        """The module the engine trains (subclasses train another one)."""
        model = create_model(self.model_cfg)
        init_logit_scale(model, self.cfg.loss.temperature())
        distributed.lift_scalar_parameters(model)
        return model

    def build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        distributed.recover_checkpoints(self.ckpt_dir)
        model = self._make_model()
        optimizer = build_optimizer(model, cfg.optim, cfg.loss.max_logit_scale)
        self.optim_settings = [{k: g[k] for k in _OPTIM_SETTINGS if k in g} for g in optimizer.param_groups]
        scheduler = cosine_schedule(optimizer, cfg.optim, cfg.train.steps)
        if cfg.optim.warmup_steps >= cfg.train.steps and distributed.is_main():
            log.warning("optim.warmup_steps %d is not below train.steps %d: the warmup is shortened to %d steps and "
                        "the learning rate is not decayed", cfg.optim.warmup_steps, cfg.train.steps,
                        max(cfg.train.steps - 1, 0))
        zero_stage = cfg.train.zero_stage
        if self.bf16 and zero_stage == 0:
            # ZeRO-1 keeps partitioned fp32 masters, which the exporter reads back.
            log.info("bf16 runs use ZeRO stage >= 1; using stage 1")
            zero_stage = 1
        self.engine = distributed.build_engine(
            model, optimizer, scheduler, micro_batch=cfg.data.batch_size, zero_stage=zero_stage,
            bf16=self.bf16, grad_clip=cfg.optim.grad_clip, accum_steps=cfg.train.accum_steps,
        )
        self.norm_stats = distributed.norm_statistics(self.engine.module)

    def resume(self, tag: str | None) -> None:
        """Restore weights, optimizer, schedule, step and data cursor (``tag`` None: latest)."""
        state = distributed.load_checkpoint(self.engine, self.ckpt_dir, tag)
        self.step = int(state.get("step", 0))
        self.skipped = int(state.get("skipped", 0))
        self.cursor.restore(state.get("data", {}))
        self._restore_checkpoint_state(state)
        self._apply_optim_settings()
        log.info("resumed at step %d", self.step)
        resumed = self._tag()
        self.superseded = {p.name for p in self._checkpoint_folders() if p.name > resumed}
        if self.superseded and distributed.is_main():
            # A restart before this run's first save resumes here, not on the run it took over from.
            distributed.point_latest(self.ckpt_dir, resumed)
            log.warning("checkpoints newer than the one resumed (%s) are from the run it took over from: "
                        "each is replaced when this run saves at its step", ", ".join(sorted(self.superseded)))

    def _apply_optim_settings(self) -> None:
        """After a resume, the config's optimizer settings rule, not the checkpoint's.

        DeepSpeed restores each group's lr, betas, eps and weight decay with the optimizer state, and
        the schedule its base lr, so an edited ``optim.lr`` (say, lowered after a loss spike) would
        silently not apply. open_clip's schedule reads the lr from its arguments, so there the edit
        applies; here too. An unchanged config leaves every value as it was, bit for bit.
        """
        schedule = self.engine.lr_scheduler
        groups = schedule.optimizer.param_groups  # the dicts DeepSpeed's optimizers update
        saved = {**groups[0], "lr": schedule.base_lrs[0]}  # a group's "lr" is the scheduled one
        changed = {k: (saved[k], v) for k, v in self.optim_settings[0].items() if saved[k] != v}
        for group, settings, factor in zip(groups, self.optim_settings, schedule.lr_lambdas):
            group.update(settings)
            group["initial_lr"] = settings["lr"]
            group["lr"] = settings["lr"] * factor(schedule.last_epoch)
        schedule.base_lrs = [settings["lr"] for settings in self.optim_settings]
        schedule._last_lr = [group["lr"] for group in groups]
        if changed and distributed.is_main():
            log.info("resume: the config's optimizer settings apply, not the checkpoint's: %s",
                     ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))

    def _loader(self):
        data = self.cfg.data
        sources = [expand_shards(part) for part in split_sources(data.train_shards)]
        weights = parse_weights(data.train_weights)
        spec = StreamSpec(
            urls=sources[0] if weights else [u for urls in sources for u in urls],
            more_sources=sources[1:] if weights else [], weights=weights, s3=self.s3,
            batch_size=data.batch_size, seed=self.cursor.seed,
            rank=distributed.rank(), world=distributed.world_size(), workers=self.cursor.workers,
            shuffle_buffer=data.shuffle_buffer, train=True, start_epoch=self.cursor.start_epoch,
            role_offset=self.cursor.consumed % self.cursor.workers, cursors=dict(self.cursor.positions),
        )
        return make_loader(spec, self.train_transform, self.tokenizer, self.image_size,
                           in_process=data.workers == 0)

    def train_step(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step over ``train.accum_steps`` micro-batches (see ``grad_cache``)."""
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        inputs = [(b["image"].to(self.device, dtype, non_blocking=True), b["text"].to(self.device, non_blocking=True))
                  for b in batches]
        loss = grad_cache_step(self.engine, inputs, functools.partial(contrastive_loss, self.cfg.loss))
        distributed.average_(self.norm_stats)
        return loss

    def fit(self) -> dict[str, float]:
        cfg = self.cfg.train
        # Only now, after a resume has been checked against the checkpoint: a mismatched --set must
        # not leave the run describing a model that its checkpoints are not.
        self._write_run_files()
        # A resume of a finished run (a restarted pod after the last save) trains nothing; its final
        # evaluation replaces the one recorded at that step. It saves again (the same state; at another
        # number of processes, re-partitioned), replacing the folder whole.
        finished = self.step >= cfg.steps
        if distributed.is_main() and self.step:
            drop_records_after(self.run_dir / "eval.jsonl", self.step - finished)  # metrics.jsonl: the logger's
        metrics = MetricsLogger(self.run_dir, total_steps=cfg.steps, start_step=self.step,
                                port=cfg.metrics_port, enabled=distributed.is_main(),
                                rank=distributed.rank() if distributed.local_rank() == 0 else None)
        global_batch = self.cfg.data.batch_size * distributed.world_size() * cfg.accum_steps
        if distributed.is_main() and self.step == 0:
            samples = self.cfg.data.train_num_samples or count_samples(
                expand_shards(self.cfg.data.train_shards), self.s3)
            if samples is None:
                log.info("training samples: unknown (S3 shards without a sizes.json beside them; "
                         "data.train_num_samples sets the count), global batch %d", global_batch)
            else:
                log.info("%d training samples, global batch %d, %.2f epochs", samples, global_batch,
                         cfg.steps * global_batch / max(samples, 1))
        if 0 < cfg.stop_at <= self.step:
            log.warning("train.stop_at %d is not after the resumed step %d: the run goes on to train.steps %d",
                        cfg.stop_at, self.step, cfg.steps)
        batches = iter(self._loader()) if not finished else iter(())  # a finished run reads nothing
        result: dict[str, float] = {}
        trace = self._key_trace()
        throughput = Throughput(global_batch)
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                step_batches = [next(batches) for _ in range(cfg.accum_steps)]
                waited = time.perf_counter() - start
                lr = self.engine.get_lr()[0]  # this step's: the schedule moves on in its optimizer step
                self._seed_step()
                loss = self.train_step(step_batches)
                self.step += 1
                throughput.step()
                self._note_finite(loss)
                for batch in step_batches:
                    self.cursor.advance(batch)
                    self.unreported_skips += batch["skipped"]
                if trace:
                    keys = [k for b in step_batches for k in b["key"]]
                    trace.write(json.dumps({"step": self.step, "keys": keys}) + "\n")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._record(metrics, loss, lr, waited, throughput)
                stop = self.step == cfg.stop_at < cfg.steps  # at the last step the run just finishes
                if stop or cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
                    throughput.restart()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate()
                    throughput.restart()
                if stop:
                    log.info("stopped at step %d as asked (train.stop_at); resume with --resume latest", self.step)
                    return {}
            self.save()
            if cfg.export:  # before the evaluation, so an evaluation that fails leaves the export written
                self.export()
            result = self.evaluate()
        finally:
            metrics.close()
            if trace:
                trace.close()
        return result

    def _key_trace(self):
        """With TANDEM_TRACE_KEYS=1, each rank appends its sample keys per step to keys.rank<R>.jsonl
        (off by default): how the resume test checks "the same samples in the same order"."""
        if os.environ.get("TANDEM_TRACE_KEYS", "").strip().lower() in ("", "0", "false", "no", "off"):
            return None
        path = self.run_dir / f"keys.rank{distributed.rank()}.jsonl"
        drop_records_after(path, self.step)
        return path.open("a", buffering=1)

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Fold this step's loss into ``self.finite`` on the device: no host sync per step."""
        self.finite &= torch.isfinite(loss.detach()).all()

    def _stop_if_diverged(self, bad_ranks: float) -> None:
        """Stop every rank with one line if any rank's loss (or, at a checkpoint, weight) went NaN
        or infinite; ``bad_ranks`` is the all-reduced count, so every rank decides alike.

        Checked at each log line (in ``_record``'s all-reduce) and before each checkpoint (with the
        weights: an absurd learning rate spoils them one step before the loss shows it), so spoilt
        weights are never saved over (or pruned in favour of) the good checkpoints. Neither fp32 nor
        bf16 skips such a step on its own: with bf16 the optimizer no longer scans gradients for
        overflow (``build_engine``).
        """
        if bad_ranks == 0:
            return
        kept = [p.name for p in self._checkpoint_folders()]
        advice = "Lower optim.lr or raise optim.warmup_steps and train again"
        if kept:
            advice = (f"the newest checkpoint ({kept[-1]}) predates it. {advice}, or resume from it "
                      f"(--resume {kept[-1]}) with the lower lr")
        else:
            advice = f"no checkpoint was written. {advice}"
        raise CollectiveError("training diverged: the loss or the weights became NaN or infinite by step "
                              f"{self.step}; {advice}")

    def _seed_step(self) -> None:
        """Seed torch's generators (dropout, patch dropout) from the seed, this rank and the step:
        ranks draw different masks, and a resumed run draws what the uninterrupted one would have."""
        seed = np.random.SeedSequence([self.cfg.train.seed, distributed.rank(), self.step]).generate_state(1)[0]
        torch.manual_seed(int(seed))

    def _record(self, metrics: MetricsLogger, loss: torch.Tensor, lr: float, waited: float,
                throughput: Throughput) -> None:
        world = distributed.world_size()
        loss_sum, wait_sum, skipped_sum, bad_ranks = distributed.all_reduce_sum(
            [float(loss), waited, self.unreported_skips, float(~self.finite)])
        samples_per_s = throughput.read()  # float(loss) above waited for the device
        self._stop_if_diverged(bad_ranks)
        self.unreported_skips = 0
        self.skipped += int(skipped_sum)
        metrics.log(self.step, {
            "loss": loss_sum / world,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "data_wait_s": wait_sum / world,
            "skipped_samples": self.skipped,
            **self._model_metrics(),
        }, skipped=int(skipped_sum))

    def _model_metrics(self) -> dict[str, float]:
        """The recorded figures that depend on the model (subclasses add their own)."""
        log_scale = self.engine.module.logit_scale.detach().float().reshape(-1)[0]
        # temperature as loss.init_temperature means it; exp(-x), not 1 / exp(x): an absurd lr can drive
        # the scale to 0 (a finite loss, stopped only at the next checkpoint's weight check)
        return {"logit_scale": float(log_scale.exp()), "temperature": float((-log_scale).exp())}

    def _checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint carries beyond the engine's weights, optimizer and schedule, the step
        and the data cursor (subclasses add their own; rank 0's copy is the one saved)."""
        return {}

    def _restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Take back what ``_checkpoint_state`` saved."""

    def save(self) -> None:
        # Under ZeRO-3 a parameter outside its forward pass is empty on every rank but its partition.
        weights = torch.stack([torch.isfinite(getattr(p, "ds_tensor", p)).all()
                               for p in self.engine.module.parameters()]).all()
        bad_ranks, skips = distributed.all_reduce_sum([float(~(self.finite & weights)), self.unreported_skips])
        self._stop_if_diverged(bad_ranks)
        tag = self._tag()
        # The checkpoint's count includes the skips not yet logged (a resume replays only what follows
        # it); the running run reports them at its next log line, as before.
        state = {"step": self.step, "data": self.cursor.state(), "skipped": self.skipped + int(skips),
                 **self._checkpoint_state()}
        distributed.save_checkpoint(self.engine, self.ckpt_dir, tag, state)
        self.superseded.discard(tag)
        if distributed.is_main():
            self._prune_checkpoints(keep=tag)
        distributed.barrier()

    def _tag(self) -> str:
        """The checkpoint tag of the current step."""
        return f"step{self.step:08d}"

    def _checkpoint_folders(self) -> list[Path]:
        """This run's checkpoints, oldest first: not those it superseded by resuming from an earlier
        one (neither pruning nor the divergence message counts them)."""
        return [p for p in checkpoint_folders(self.ckpt_dir) if p.name not in self.superseded]

    def _prune_checkpoints(self, keep: str) -> None:
        tags = self._checkpoint_folders()
        for old in tags[: max(0, len(tags) - self.cfg.train.keep_checkpoints)]:
            if old.name != keep:  # out of the step* names first, so a kill mid-delete leaves no half folder
                doomed = old.rename(old.with_name(f".pruning-{old.name}"))
                shutil.rmtree(doomed, ignore_errors=True)

    def evaluate(self) -> dict[str, float]:
        data = self.cfg.data
        if not data.val_shards:
            return {}
        result = evaluate(
            self.engine.module, self.tokenizer, self.eval_transform, shards=data.val_shards,
            classes_path=data.classes, image_size=self.image_size, batch_size=data.eval_batch_size,
            device=self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32, s3=self.s3,
        )
        if distributed.is_main():
            with (self.run_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, **result}) + "\n")
            log.info("eval at step %d: %s", self.step, ", ".join(
                f"{key} {result[key]:.3f}" for key in ("zero_shot_top1", "image_to_text_recall@1") if key in result))
        return result

    def export(self) -> Path:
        out = self.run_dir / "export"
        if distributed.is_main():
            export_checkpoint(self.run_dir, out)
            log.info("exported open_clip model to %s", out)
        distributed.barrier()
        return out


def _latest(trainer: Trainer) -> tuple[str | None, bool]:
    """The checkpoint ``--resume latest`` takes, and whether ``latest`` named it. Checkpoint folders
    keep their step* names only once complete (``distributed.save_checkpoint``), so without the
    pointer (deleted, not copied with them, or empty) the newest folder is the one to take."""
    pointer = trainer.ckpt_dir / "latest"
    tag = pointer.read_text().strip() if pointer.is_file() else ""
    if tag:
        return tag, True
    folders = trainer._checkpoint_folders()
    return (folders[-1].name, False) if folders else (None, False)


def train(cfg: Config, resume: str | None = None) -> dict[str, float]:
    """Run (or resume) training; returns the final evaluation (empty without a held-out split)."""
    distributed.init()
    if cfg.method.name != "clip":  # an image-only baseline on the same engine, data and checkpoints
        from training.unimodal.trainer import UnimodalTrainer

        trainer = UnimodalTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    trainer.build()
    pointed = True
    if resume == "latest":
        # Rank 0 reads the folder and every rank takes its answer: ranks that looked for themselves
        # could see it differently (a shared filesystem's cached listing) and part ways.
        resume, pointed = distributed.all_gather_object(_latest(trainer) if distributed.is_main() else None)[0]
        if resume is None:
            log.info("no checkpoint in %s yet: starting from scratch", trainer.ckpt_dir)
        elif not pointed and distributed.is_main():
            log.warning("no 'latest' pointer in %s: resuming the newest checkpoint, %s", trainer.ckpt_dir, resume)
    if resume:
        trainer.resume(resume)
        if not pointed and distributed.is_main():
            distributed.point_latest(trainer.ckpt_dir, resume)  # the export, and the next restart, read it
    elif distributed.is_main():
        # A fresh start (a restarted pod before the first checkpoint, or a run dir without checkpoints):
        # the steps an earlier attempt logged are trained, and logged, again.
        for name in ("metrics.jsonl", "eval.jsonl"):
            drop_records_after(trainer.run_dir / name, 0)
    return trainer.fit()
