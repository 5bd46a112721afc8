"""Which open_clip ``model_cfg`` a run trains, found without importing open_clip or torch.

``tandem train --nproc N`` checks the model name in the launching process before it starts the
workers; importing open_clip there (torchvision, timm, transformers, dynamo: ~15 s on a 2-core box)
would delay every launch, and a mistyped name should fail in a second. open_clip's own registry is
the JSON files of its ``model_configs`` folder, so looking a name up there (after Tandem's own
folder, which ``training.model.register_configs`` adds in front of it) finds what
``open_clip.get_model_config`` finds; only ``hf-hub:`` names need open_clip itself.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from training.config import ModelConfig
from training.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
REQUIRED_KEYS = frozenset({"embed_dim", "vision_cfg", "text_cfg"})
EXPORT_CONFIG_FILE = "open_clip_config.json"  # in an export: open_clip's local-dir: layout
EXPORT_WEIGHTS_FILE = "open_clip_model.safetensors"  # beside it (open_clip falls back to random weights without)
MODEL_CFG_FILE = "model_cfg.json"  # beside a run's checkpoints: what open_clip builds


def read_model_config(path: Path) -> Any:
    """A model-config JSON file's ``model_cfg`` (open_clip's export layout) or the whole file."""
    if not path.is_file():
        raise UserError(f"model config file not found: {path}")
    try:
        model_cfg = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"model config {path} is not valid JSON: {error}") from None
    return model_cfg.get("model_cfg", model_cfg) if isinstance(model_cfg, dict) else model_cfg


@functools.cache
def _open_clip_config_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # locates the package without running it
    folders = [Path(f) / "model_configs" for f in (spec.submodule_search_locations or [])] if spec else []
    return next((f for f in folders if f.is_dir()), None)


def named_model_config(name: str) -> dict[str, Any] | None:
    """The config registered under ``name`` (Tandem's configs first, then open_clip's), or None."""
    if name.startswith("local-dir:"):
        return read_model_config(Path(name.removeprefix("local-dir:")) / EXPORT_CONFIG_FILE)
    if name.startswith("hf-hub:"):
        import open_clip

        try:  # from the local Hugging Face cache: nothing can be downloaded at run time
            return open_clip.get_model_config(name)
        except Exception as error:  # noqa: BLE001 - the hub client raises many unrelated types
            raise UserError(f"cannot read the config of {name} ({type(error).__name__}): hf-hub: names need the "
                            "model in the local Hugging Face cache, or use an export folder or a config .json") from None
    for folder in filter(None, (CONFIG_DIR, _open_clip_config_dir())):
        path = folder / f"{name}.json"
        model_cfg = read_model_config(path) if path.is_file() else None
        if isinstance(model_cfg, dict) and REQUIRED_KEYS <= set(model_cfg):
            return model_cfg
    return None


def image_side(model_cfg: dict[str, Any]) -> int:
    """The side in pixels of the images the model config's image tower is built for."""
    size = model_cfg["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def resolve_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` dict this run trains, with Tandem's overrides applied."""
    if cfg.name.endswith(".json"):
        model_cfg = read_model_config(Path(cfg.name))
    else:
        model_cfg = named_model_config(cfg.name)
        if model_cfg is None:
            raise UserError(f"unknown model '{cfg.name}' (see open_clip.list_models())")
    model_cfg = copy.deepcopy(model_cfg)
    if not isinstance(model_cfg, dict) or not REQUIRED_KEYS <= set(model_cfg):
        raise UserError(f"model config '{cfg.name}' needs embed_dim, vision_cfg and text_cfg")
    vision = model_cfg["vision_cfg"]
    if not isinstance(vision, dict) or not isinstance(vision.get("image_size"), (int, list, tuple)):
        raise UserError(f"model config '{cfg.name}' needs vision_cfg.image_size (the image side in pixels)")
    if cfg.hf_text_model:
        model_cfg["text_cfg"] = _hf_text_cfg(cfg, model_cfg["text_cfg"])
    if cfg.context_length:
        model_cfg["text_cfg"]["context_length"] = cfg.context_length
    if cfg.hf_text_model:
        _check_hf_positions(Path(cfg.hf_text_model).resolve(), model_cfg["text_cfg"]["context_length"])
    return model_cfg


def _check_hf_positions(path: Path, context_length: int) -> None:
    """A Hugging Face tower embeds at most ``max_position_embeddings`` tokens."""
    try:
        positions = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"model.hf_text_model {path}: config.json is not a JSON object") from None
    if isinstance(positions, int) and context_length > positions:
        raise UserError(f"model.context_length {context_length} exceeds the {positions} positions of "
                        f"model.hf_text_model {path}; set model.context_length <= {positions}")


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


def check_export_dir(model_dir: str | Path) -> Path:
    """A folder written by ``tandem export`` (open_clip's ``local-dir:``), checked without loading it:
    its config names a model, and its weights file is there with a readable header. open_clip itself
    would build a randomly initialised model when the weights file is missing, and score that. Here,
    not in ``training.checks``: the serving image has none of the training side's packages."""
    path = Path(model_dir)
    if not (path / EXPORT_CONFIG_FILE).is_file():
        raise UserError(f"{path} is not an exported model (no {EXPORT_CONFIG_FILE})")
    model_cfg = read_model_config(path / EXPORT_CONFIG_FILE)
    if not isinstance(model_cfg, dict) or not REQUIRED_KEYS <= set(model_cfg):
        raise UserError(f"{path / EXPORT_CONFIG_FILE} is not an export's config (its model_cfg needs embed_dim, "
                        "vision_cfg and text_cfg)")
    if not (path / EXPORT_WEIGHTS_FILE).is_file():
        raise UserError(f"{path} has no {EXPORT_WEIGHTS_FILE} (only safetensors weights are loaded)")
    check_safetensors(path / EXPORT_WEIGHTS_FILE)
    return path


def check_safetensors(path: Path) -> None:
    """The file's safetensors header reads (only the header: the tensors stay on disk)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # "pt" would import torch for a header
            f.keys()
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: either way not usable weights
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
