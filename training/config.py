"""Run configuration: frozen dataclasses, one per component, filled from TOML deltas.

A TOML file states only what differs from the defaults below. ``--set section.key=value`` overrides
apply on top. Unknown sections or keys are errors that name the offending key, because a typo that
silently falls back to a default wastes a multi-GPU run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from training.errors import UserError


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the image-caption shards are and how they are batched."""

    train_shards: str = ""
    """WebDataset shard list in brace notation, e.g. ``/data/train/shard-{00000..00099}.tar``."""
    train_num_samples: int = 0
    """Samples in one epoch, for the start-up log line's epoch estimate only (0: ``sizes.json`` beside the
    shards, else the tars counted). The loader's epochs are always whole passes over the shards."""
    val_shards: str = ""
    """Held-out shards for zero-shot and retrieval evaluation ("" disables evaluation)."""
    classes: str = ""
    """``classes.json`` with ``classes`` and ``templates`` for zero-shot evaluation."""
    batch_size: int = 128
    """Micro-batch per rank; the global batch (and the negatives per step) is
    ``batch_size * world * train.accum_steps``."""
    eval_batch_size: int = 256
    """Batch per rank during evaluation."""
    workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples held in the shuffle buffer of each worker."""
    train_weights: str = ""
    """Sampling weights of the ``::``-separated sources of ``train_shards``, e.g. ``"1::3"``
    ("" concatenates the sources)."""
    s3_endpoint_url: str = ""
    """S3-compatible endpoint (MinIO, Ceph, SeaweedFS); "" uses ``AWS_ENDPOINT_URL`` or AWS itself."""
    s3_region: str = ""
    s3_access_key_id: str = ""
    """Prefer the environment or the AWS credential chain; this is for stores without either."""
    s3_secret_access_key: str = ""
    s3_retry_seconds: float = 300.0
    """How long a shard read keeps retrying an unreachable store before the run fails."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which open_clip model to train."""

    name: str = "tandem-tiny"
    """open_clip model name (``open_clip.list_models()``) or the path of a model-config JSON file."""
    hf_text_model: str = ""
    """Local directory of a Hugging Face text encoder that replaces the text tower ("" keeps it)."""
    hf_pooler: str = "mean_pooler"
    """Pooling of the Hugging Face tower's token states (open_clip's ``hf_pooler_type``)."""
    context_length: int = 0
    """Tokenizer context length; 0 keeps the model config's value."""


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The contrastive objective."""

    impl: str = "gather"
    """``gather``: InfoNCE, each rank scores its rows against the whole gathered global batch
    (``B x N`` logits per rank). ``tiled``: the same loss and gradients computed tile by tile, memory
    linear in the global batch (Inf-CL). ``siglip``: SigLIP's pairwise sigmoid loss with a learnable
    bias, tiled the same way."""
    tile_size: int = 1024
    """Side of the square logit tiles of ``tiled`` and ``siglip``; each tile is ``tile_size**2`` fp32."""
    init_temperature: float = 0.0
    """Initial temperature; ``logit_scale`` starts at ``log(1 / init_temperature)``. 0 takes the
    paper's value for the loss: 0.07 for InfoNCE (CLIP), 0.1 for SigLIP."""
    init_logit_bias: float = -10.0
    """SigLIP only: the initial ``logit_bias`` (the paper's -10)."""
    max_logit_scale: float = 100.0
    """Upper bound of ``exp(logit_scale)``, enforced on the optimizer's own copy of the parameter."""

    def temperature(self) -> float:
        """``init_temperature`` with 0 resolved to the loss's paper value."""
        if self.init_temperature:
            return self.init_temperature
        return 0.1 if self.impl == "siglip" else 0.07


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    """Applied to weight matrices only; never to biases, norms, embeddings or the temperature."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    """The cosine ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Length of the run, precision, parallelism and bookkeeping."""

    run_dir: str = "runs/default"
    steps: int = 1000
    """Optimizer steps in the whole run."""
    seed: int = 0
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0 to 3."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    log_every: int = 1
    """Steps between metric records (JSON lines, Prometheus, progress bar)."""
    checkpoint_every: int = 0
    """Steps between DeepSpeed checkpoints (0: only the final one)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk; older ones are deleted."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""
    metrics_port: int = 0
    """Port of rank 0's Prometheus endpoint (0 disables it)."""
    export: bool = True
    """Write the consolidated open_clip export at the end of the run."""
    stop_at: int = 0
    """Checkpoint and exit after this step, as a preempted job would (0: run to ``steps``)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step. Contrastive accumulation (GradCache): the negatives of one
    step are all ``accum_steps * data.batch_size * world`` samples, as if that were the batch."""


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """The training objective: CLIP (image-text) or an image-only baseline (``training/unimodal``).

    A knob that a method does not use is ignored by it; 0 means "the method's paper value"."""

    name: str = "clip"
    """``clip`` or one of ``simclr``, ``moco`` (v2), ``moco_v3``, ``byol``, ``simsiam``,
    ``barlow_twins``, ``swav``, ``supcon``."""
    temperature: float = 0.0
    """Softmax temperature of SimCLR, MoCo v2, MoCo v3, SwAV, SupCon (0: the papers' 0.5, 0.2, 1.0 (its
    ResNet value; 0.2 for ViTs), 0.1, 0.1)."""
    proj_hidden: int = 512
    """Hidden width of the projection (and prediction) MLPs."""
    proj_dim: int = 128
    """Output width of the projection head (the embedding the loss sees)."""
    predictor: bool = True
    """BYOL/SimSiam/MoCo v3: use the prediction head (false makes BYOL and SimSiam collapse; for tests)."""
    momentum: float = -1.0
    """MoCo/BYOL: EMA momentum of the target (key) encoder; the cosine schedule of BYOL and MoCo v3
    starts here (MoCo v2 keeps it constant). -1 (the default): the paper's value (MoCo v2 0.999, MoCo v3
    0.99, BYOL 0.996); 0 makes the target a copy of the online network at every step."""
    momentum_end: float = 1.0
    """BYOL, MoCo v3: the momentum the cosine schedule reaches at the last step."""
    queue_size: int = 4096
    """MoCo v2: keys kept as negatives, independent of the batch size (v3 has no queue)."""
    shuffle_bn: bool = True
    """MoCo v2/v3: shuffle the key batch across ranks around the key encoder (no BatchNorm shortcut)."""
    barlow_lambda: float = 0.0051
    """Barlow Twins: weight of the off-diagonal (redundancy-reduction) terms (the paper's value)."""
    prototypes: int = 3000
    """SwAV: number of prototypes (the paper's 3000). Keep it above ``proj_dim``: with fewer, the
    embeddings can collapse onto a point equally far from every prototype (the loss then sits at
    log(prototypes) with uniform codes)."""
    sinkhorn_iters: int = 3
    sinkhorn_epsilon: float = 0.05
    freeze_prototypes_steps: int = 313
    """SwAV: optimizer steps at the start during which the prototypes take no gradient (the paper's
    first epoch, 313 steps at its batch of 4096)."""
    small_crops: int = 2
    """SwAV: low-resolution crops besides the two global ones (multi-crop)."""
    swav_queue: int = 0
    """SwAV: embeddings of earlier global crops (one queue per global crop, the global batch's rows
    over all ranks) scored against the current prototypes beside the batch in Sinkhorn-Knopp, so a
    small batch still spreads over many prototypes (the paper's 3840 at its batch of 256; 0: none).
    Used once full; each rank scores its own ``1/world`` of it; only the batch's codes are kept."""
    swav_queue_start_steps: int = 0
    """SwAV: optimizer steps before the queue starts filling (the paper starts it at epoch 15)."""
    image_size: int = 0
    """Side of the global crops (0: the model config's image size)."""
    crop_min_scale: float = 0.0
    """Smallest area fraction of the random resized crop (0: the paper's value)."""
    label_key: str = "shape"
    """Key of the samples' ``.json`` sidecar holding the class, for kNN/linear evaluation and SupCon."""
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear_steps: int = 300
    """Full-batch AdamW steps of the linear probe on frozen backbone features."""
    eval_train_samples: int = 5000
    """Labelled training samples embedded for the kNN bank and the probe's training set."""
    collapse_threshold: float = 0.1
    """Flag collapse when the per-dimension std of the normalised embeddings, times sqrt(dim),
    falls below this (1 for isotropic embeddings, 0 for a constant one)."""


METHOD_NAMES = ("clip", "simclr", "moco", "moco_v3", "byol", "simsiam", "barlow_twins", "swav", "supcon")


@dataclass(frozen=True, kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def validate(self) -> "Config":
        """Reject values no run could use, before any process starts; return self so calls chain."""
        for key, ok, rule in _RULES:
            section, _, name = key.partition(".")
            value = getattr(getattr(self, section), name)
            if not ok(value):
                raise UserError(f"{key} must be {rule}, got {value!r}")
        checks = [
            (self.loss.max_logit_scale > 1 / self.loss.temperature(),
             "loss.max_logit_scale must exceed 1 / loss.init_temperature"),
            (bool(self.data.train_shards), "data.train_shards is empty: name the training shards"),
            (self.method.name == "clip" or self.train.zero_stage < 3,
             "image-only methods support train.zero_stage 0, 1 or 2"),
            (self.method.momentum == -1 or self.method.momentum_end >= self.method.momentum,
             f"method.momentum_end {self.method.momentum_end} is below method.momentum {self.method.momentum}: "
             "the cosine schedule rises from momentum to momentum_end"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


LOSS_IMPLS = ("gather", "tiled", "siglip")
HF_POOLERS = ("mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler")  # open_clip's


Rule = tuple[Callable[[Any], bool], str]  # the test, and the rule as the error states it


def _at_least(low: float, note: str = "") -> Rule:
    return (lambda value: value >= low), f">= {low}" + (f" ({note})" if note else "")


def _above(low: float, note: str = "") -> Rule:
    return (lambda value: value > low), f"> {low}" + (f" ({note})" if note else "")


def _within(low: float, high: float, text: str) -> Rule:
    return (lambda value: low <= value <= high), text


def _below_one(value: float) -> bool:
    return 0 <= value < 1


def _one_of(values: tuple, text: str = "") -> Rule:
    return (lambda value: value in values), text or "one of " + ", ".join(map(str, values))


# Every range a knob has, checked up front so a mistyped value fails in one line instead of minutes
# into a run. Knobs whose 0 means "default" or "off" accept 0.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.train_num_samples", *_at_least(0)),
    ("data.batch_size", *_at_least(1)),
    ("data.eval_batch_size", *_at_least(1)),
    ("data.workers", *_at_least(0)),
    ("data.shuffle_buffer", *_at_least(0)),
    ("data.s3_retry_seconds", *_at_least(0)),
    ("model.context_length", *_within(0, 4096, "in [0, 4096] (0 keeps the model's)")),
    ("model.hf_pooler", *_one_of(HF_POOLERS)),
    ("loss.impl", *_one_of(LOSS_IMPLS)),
    ("loss.tile_size", *_at_least(1)),
    ("loss.init_temperature", *_at_least(0, "0: the loss's default")),
    ("loss.max_logit_scale", *_above(0)),
    ("optim.lr", lambda value: 0 < value <= 1e30, "> 0 and <= 1e30 (torch's Adam step must fit a float32)"),
    ("optim.weight_decay", *_at_least(0)),
    ("optim.beta1", _below_one, "in [0, 1)"),
    ("optim.beta2", _below_one, "in [0, 1)"),
    ("optim.eps", *_above(0)),
    ("optim.warmup_steps", *_at_least(0)),
    ("optim.min_lr_ratio", *_within(0, 1, "in [0, 1]")),
    ("optim.grad_clip", *_at_least(0, "0 disables it")),
    ("train.steps", *_at_least(1)),
    ("train.seed", *_within(0, 2**32 - 1, "in [0, 4294967295]")),
    ("train.zero_stage", *_one_of((0, 1, 2, 3), "0, 1, 2 or 3")),
    ("train.precision", *_one_of(("auto", "fp32", "bf16"), "auto, fp32 or bf16")),
    ("train.log_every", *_at_least(1)),
    ("train.checkpoint_every", *_at_least(0, "0: only the final checkpoint")),
    ("train.keep_checkpoints", *_at_least(1)),
    ("train.eval_every", *_at_least(0, "0: only at the end")),
    ("train.metrics_port", *_within(0, 65535, "a port, 1 to 65535 (or 0 for none)")),
    ("train.stop_at", *_at_least(0)),
    ("train.accum_steps", *_at_least(1)),
    ("method.name", *_one_of(METHOD_NAMES)),
    ("method.temperature", *_at_least(0, "0: the paper's")),
    ("method.proj_hidden", *_at_least(1)),
    ("method.proj_dim", *_at_least(1)),
    ("method.momentum", lambda value: value == -1 or 0 <= value < 1,
     "in [0, 1) (at 1 the target never leaves its initial weights), or -1 for the paper's"),
    ("method.momentum_end", *_within(0, 1, "in [0, 1]")),
    ("method.queue_size", *_at_least(1)),
    ("method.barlow_lambda", *_at_least(0)),
    ("method.prototypes", *_at_least(2, "with one, every code is the same and the loss is 0")),
    ("method.sinkhorn_iters", *_at_least(1)),
    ("method.sinkhorn_epsilon", *_above(0)),
    ("method.freeze_prototypes_steps", *_at_least(0)),
    ("method.small_crops", *_at_least(0)),
    ("method.swav_queue", *_at_least(0, "0: none")),
    ("method.swav_queue_start_steps", *_at_least(0)),
    ("method.image_size", *_at_least(0, "0 keeps the model's")),
    ("method.crop_min_scale", *_within(0, 1, "in [0, 1] (0 for the paper's)")),
    ("method.knn_k", *_at_least(1)),
    ("method.knn_temperature", *_above(0)),
    ("method.linear_steps", *_at_least(1)),
    ("method.eval_train_samples", *_at_least(2, "the probe standardises features over them")),
    ("method.collapse_threshold", *_at_least(0)),
)
_SECTION_TYPES = {f.name: type(f.default_factory()) for f in fields(Config)}


def _coerce(section: str, key: str, value: Any, kind: type) -> Any:
    default = getattr(kind(), key)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise UserError(f"{section}.{key} must be a finite number, got {value!r:.40}")
            return number
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise UserError(f"{section}.{key} must be a {type(default).__name__}, got {value!r}")


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a nested ``{section: {key: value}}`` delta to ``base`` (defaults when None)."""
    base = base or Config()
    sections = {}
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            raise UserError(f"unknown config section '{section}' (known: {', '.join(_SECTION_TYPES)})")
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a table")
        kind = _SECTION_TYPES[section]
        known = {f.name for f in fields(kind)}
        for key in values:
            if key not in known:
                raise UserError(f"unknown config key '{section}.{key}' (known: {', '.join(sorted(known))})")
        updates = {k: _coerce(section, k, v, kind) for k, v in values.items()}
        sections[section] = dataclasses.replace(getattr(base, section), **updates)
    return dataclasses.replace(base, **sections)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested delta; the value is read as TOML, else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set expects section.key=value, got '{text}'")
    path, value = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    value = value.strip()  # `key = value`, as in TOML: the spaces are not part of the value
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    kind = _SECTION_TYPES.get(section)
    if kind is not None and isinstance(getattr(kind(), key, None), str) and not isinstance(parsed, str):
        parsed = value.strip()  # a path, name or key that reads as a TOML date or number is still text
    return {section: {key: parsed}}


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or nothing) and apply ``--set`` overrides; validation is the caller's call."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not UTF-8 text (TOML files are UTF-8)") from None
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"config file {path} is not valid TOML: {error}") from None
        config = from_dict(raw, config)
    for text in overrides:
        config = from_dict(parse_override(text), config)
    return config


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string. JSON's escapes are TOML's, except that TOML has no surrogate
    pairs (so characters beyond the BMP stay themselves) and bars a raw DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml(config: Config) -> str:
    """Serialise the resolved config; every value is a TOML scalar, so no TOML writer is needed."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, str):
                rendered = toml_string(value)
            else:
                rendered = repr(value)
            lines.append(f"{key} = {rendered}")
        lines.append("")
    return "\n".join(lines)
