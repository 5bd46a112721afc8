"""Consolidated fp32 export in open_clip's ``local-dir:`` format.

The directory holds ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) and
``open_clip_model.safetensors``; a Hugging Face text tower also brings its config and tokenizer
files, so ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` need nothing else.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from data.files import atomic_replace, atomic_write
from training import distributed
from training.checks import check_run_dir
from training.errors import UserError
from training.model import create_model
from training.model_config import EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE, MODEL_CFG_FILE

_HF_FILES = ("*.json", "*.txt", "*.model")  # HF config and tokenizer, never its weights


def write_run_model_config(run_dir: Path, model_cfg: dict, preprocess_cfg: dict) -> None:
    (run_dir / MODEL_CFG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``path`` appears whole (``atomic_replace``), written by safetensors without a copy in memory."""
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp)))


def export_state_dict(state: dict[str, torch.Tensor], model_cfg: dict, preprocess_cfg: dict, out: Path) -> Path:
    """Load ``state`` into a fresh open_clip model (strictly) and write it as an export."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(model_cfg)
    hf_source = model_cfg["text_cfg"].get("hf_model_name")
    if hf_source:
        for pattern in _HF_FILES:
            for path in Path(hf_source).glob(pattern):
                shutil.copy2(path, out / path.name)
        model_cfg["text_cfg"]["hf_model_name"] = str(out.resolve())
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(out.resolve())
    model = create_model(model_cfg, pretrained_text=False)
    reference = model.state_dict()
    # The trainer's one-element logit_scale goes back to open_clip's 0-dim shape; nothing else is reshaped.
    state = {k: v.reshape(()) if k in reference and reference[k].dim() == 0 and v.numel() == 1 else v
             for k, v in state.items()}
    wrong = [k for k, v in state.items() if k in reference and v.shape != reference[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"checkpoint does not match the model: {k} is {list(state[k].shape)} in the checkpoint and "
                        f"{list(reference[k].shape)} in the model config ({len(wrong)} tensor(s) differ)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    # Each file appears whole (written aside, then renamed), the config last: a server waiting for the
    # export (`tandem serve --wait-for-model`) loads it only once both are complete.
    write_safetensors(tensors, out / EXPORT_WEIGHTS_FILE)
    atomic_write(out / EXPORT_CONFIG_FILE,
                 json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2).encode())
    return out


def export_checkpoint(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    """Export a DeepSpeed checkpoint of ``run_dir`` (``tag`` or the latest)."""
    checkpoint_dir, tag = check_run_dir(run_dir, tag)
    saved: dict[str, Any] = json.loads((Path(run_dir) / MODEL_CFG_FILE).read_text())
    state = distributed.consolidated_state_dict(checkpoint_dir, tag)
    return export_state_dict(state, saved["model_cfg"], saved["preprocess_cfg"], out)
