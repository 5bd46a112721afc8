"""open_clip models from a resolved config (``training.model_config``), with an optional Hugging Face
text tower.

Tandem keeps the model exactly as open_clip builds it, so an export loads back with
``open_clip.create_model_and_transforms("local-dir:DIR")`` and nothing Tandem-specific.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from training.model_config import CONFIG_DIR

_registered = False


def register_configs() -> None:
    """Add Tandem's shipped model configs (e.g. ``tandem-tiny``) to open_clip's registry."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def create_model(model_cfg: dict[str, Any], *, pretrained_text: bool = True) -> torch.nn.Module:
    """Instantiate the open_clip module; a Hugging Face tower loads its local weights if asked."""
    model_cfg = copy.deepcopy(model_cfg)
    if "hf_model_name" in model_cfg["text_cfg"]:
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
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=text_cfg["context_length"]
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg["context_length"])
