"""Embed and zero-shot classify with an open_clip model: pure torch, no HTTP, no threads.

Shape legend: B = images or texts in a batch, C = labels, T = prompt templates, D = embed dim.

Models load with safetensors only (never pickle): an export directory through open_clip's
``local-dir:``, or an open_clip model name / model-config JSON plus a ``.safetensors`` file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from serving.settings import PRECISIONS
from serving.text import BoundedTokenizer
from training.errors import UserError
from training.model import register_configs
from training.model_config import (EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE, REQUIRED_KEYS, check_export_dir,
                                   check_safetensors, read_model_config)

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """An open_clip model in eval mode with its eval transform and tokenizer.

    ``tokenize`` is the tokenizer at a bounded cost per text (``serving/text.py``): the server
    tokenizes request texts with it, on its decode threads, and hands the tokens to the model thread.
    """

    model: torch.nn.Module
    transform: Callable
    tokenizer: Callable
    device: torch.device
    name: str
    precision: str = "fp32"  # or "bf16": forward passes under autocast, outputs float32

    def __post_init__(self) -> None:
        self.model.eval()
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # softmax(logit_scale.exp() * cosine) is CLIP's own zero-shot probability
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())
        self.tokenize = BoundedTokenizer(self.tokenizer)
        with torch.no_grad():
            self.embed_dim = int(self.encode_texts(["x"]).shape[1])

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed images -> ``[B, D]`` L2-normalised float32 on the CPU."""
        with self._autocast():
            features = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids (from ``tokenize``) -> ``[B, D]`` L2-normalised float32 on the CPU."""
        with self._autocast():
            features = self.model.encode_text(tokens.to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """``B`` strings -> ``[B, D]`` L2-normalised float32 on the CPU."""
        return self.encode_tokens(self.tokenize(texts))

    def classify(self, image_features: torch.Tensor, label_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, cosine scores), both ``[B, C]``: softmax over the labels of scale * cosine."""
        scores = image_features @ label_features.T
        return (self.logit_scale * scores).softmax(dim=-1), scores


def prompts(labels: list[str], templates: list[str]) -> list[str]:
    """The ``C * T`` prompts, label-major: ``[t.format(label) for label in labels for t in templates]``."""
    return [template.format(label) for label in labels for template in templates]


def ensemble(prompt_features: torch.Tensor, num_templates: int) -> torch.Tensor:
    """``[C*T, D]`` normalised prompt embeddings -> ``[C, D]``: per label, the normalised mean.

    Exactly ``training.evaluate.class_embeddings``, so the server's zero-shot equals ``tandem eval``'s.
    """
    per_label = prompt_features.reshape(-1, num_templates, prompt_features.shape[-1])
    return F.normalize(per_label.mean(dim=1), dim=-1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{device}' (auto, cpu, cuda or cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"device '{device}' is not supported (auto, cpu, cuda or cuda:N)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device '{device}' asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 needs hardware that computes in it. A GPU must be Ampere or newer (compute capability 8.0:
    torch's ``is_bf16_supported`` also says yes to the emulation on older ones); a CPU without
    AVX512-BF16 or AMX is only warned about, by ``load_engine`` (emulated, slower than fp32)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        raise UserError(f"--precision bf16 asked for, but {torch.cuda.get_device_name(device)} computes bf16 only "
                        "by emulation (it needs compute capability 8.0, Ampere, or newer): use fp32")


def native_cpu_bf16() -> bool:
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def export_complete(model: str) -> bool:
    """Whether ``model`` is an export directory ``tandem export`` has finished (it writes the config last)."""
    path = Path(model)
    return (path / EXPORT_CONFIG_FILE).is_file() and (path / EXPORT_WEIGHTS_FILE).is_file()


def check_model(model: str, weights: str | None) -> tuple[str, str | None]:
    """Validate ``--model``/``--weights`` without loading anything: (open_clip name, weights file)."""
    path = Path(model)
    if path.is_dir():
        check_export_dir(path)
        if weights:
            raise UserError("--weights is only for a model name or config; an export directory has its own")
        return f"local-dir:{path.resolve()}", None
    if not weights:
        raise UserError(f"{model} is not an export directory; a model name or config needs --weights FILE.safetensors")
    if not weights.endswith(".safetensors") or not Path(weights).is_file():
        raise UserError(f"--weights must be an existing .safetensors file (no pickle), got {weights}")
    check_safetensors(Path(weights))
    if model.endswith(".json"):
        cfg = read_model_config(path)
        if not isinstance(cfg, dict) or not REQUIRED_KEYS <= set(cfg):
            raise UserError(f"model config {path} needs embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem, weights
    register_configs()
    if open_clip.get_model_config(model) is None:
        raise UserError(f"unknown model '{model}': not an export directory, a config .json or an open_clip name")
    return model, weights


def model_embed_dim(name: str) -> int | None:
    """The embedding dimension a checked model name will have (None if its config does not say)."""
    cfg = open_clip.get_model_config(name)
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


def load_engine(model: str, weights: str | None = None, device: str = "auto", precision: str = "fp32") -> Engine:
    """Load an export directory (``local-dir:``) or a model name/config plus safetensors weights."""
    name, weights = check_model(model, weights)
    target = resolve_device(device)
    check_precision(precision, target)
    if precision == "bf16" and target.type == "cpu" and not native_cpu_bf16():
        log.warning("--precision bf16: this CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated and "
                    "slower than fp32")
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=target,
                                                                   pretrained_text=False)
    except (AssertionError, KeyError, RuntimeError) as error:
        # open_clip's checks of a state dict against the model: an assert (position embeddings), a
        # missing key, or load_state_dict's mismatch. Any other error (CUDA's included) is not the weights'.
        if isinstance(error, RuntimeError) and "state_dict" not in str(error):
            raise
        source = weights or f"{model}/{EXPORT_WEIGHTS_FILE}"
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"the weights {source} do not fit model '{model}': {detail}") from None
    tokenizer = open_clip.get_tokenizer(name)
    return Engine(model=net, transform=preprocess, tokenizer=tokenizer, device=target, name=str(model),
                  precision=precision)
