"""open_clip models by name or JSON config, with an optional Hugging Face text tower.

Tandem keeps the model exactly as open_clip builds it, so an export loads back with
``open_clip.create_model_and_transforms("local-dir:DIR")`` and nothing Tandem-specific.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from training.config import ModelConfig
from training.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_configs() -> None:
    """Add Tandem's shipped model configs (e.g. ``tandem-tiny``) to open_clip's registry."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def read_model_config(path: Path) -> Any:
    """A model-config JSON file's ``model_cfg`` (open_clip's export layout) or the whole file."""
    if not path.is_file():
        raise UserError(f"model config file not found: {path}")
    try:
        model_cfg = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"model config {path} is not valid JSON: {error}") from None
    return model_cfg.get("model_cfg", model_cfg) if isinstance(model_cfg, dict) else model_cfg


def resolve_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` dict this run trains, with Tandem's overrides applied."""
    register_configs()
    if cfg.name.endswith(".json"):
        model_cfg = read_model_config(Path(cfg.name))
    else:
        model_cfg = open_clip.get_model_config(cfg.name)
        if model_cfg is None:
            raise UserError(f"unknown model '{cfg.name}' (see open_clip.list_models())")
    model_cfg = copy.deepcopy(model_cfg)
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise UserError(f"model config '{cfg.name}' needs embed_dim, vision_cfg and text_cfg")
    if cfg.hf_text_model:
        model_cfg["text_cfg"] = _hf_text_cfg(cfg, model_cfg["text_cfg"])
    if cfg.context_length:
        model_cfg["text_cfg"]["context_length"] = cfg.context_length
    return model_cfg


def _hf_text_cfg(cfg: ModelConfig, base: dict[str, Any]) -> dict[str, Any]:
    path = Path(cfg.hf_text_model).resolve()
    if not (path / "config.json").is_file():
        raise UserError(f"model.hf_text_model {path} is not a Hugging Face model directory")
    return {
        "hf_model_name": str(path),
        "hf_tokenizer_name": str(path),
        "hf_proj_type": "linear",
        "hf_pooler_type": cfg.hf_pooler,
        "context_length": base.get("context_length", 32),
    }


def create_model(model_cfg: dict[str, Any], *, pretrained_text: bool = True) -> torch.nn.Module:
    """Instantiate the open_clip module; a Hugging Face tower loads its local weights if asked."""
    model_cfg = copy.deepcopy(model_cfg)
    if "hf_model_name" in model_cfg["text_cfg"]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_cfg["text_cfg"]["hf_model_pretrained"] = pretrained_text
        return open_clip.CustomTextCLIP(**model_cfg, output_dict=True)
    return open_clip.CLIP(**model_cfg, output_dict=True)


def init_logit_scale(model: torch.nn.Module, init_temperature: float) -> None:
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / init_temperature))


def preprocess_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return asdict(PreprocessCfg(size=model_cfg["vision_cfg"]["image_size"]))


def transforms(preprocess_cfg: dict[str, Any]) -> tuple[Callable, Callable]:
    """open_clip's (train, eval) image transforms for this preprocess config."""
    pp = PreprocessCfg(**preprocess_cfg)
    return image_transform_v2(pp, is_train=True), image_transform_v2(pp, is_train=False)


def tokenizer(model_cfg: dict[str, Any]) -> Callable:
    """open_clip's tokenizer for the text tower: BPE for CLIP towers, HF for HF towers."""
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=text_cfg["context_length"]
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg["context_length"])
