"""Fixtures shared by the serving tests: a randomly initialised tandem-tiny export and its index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_export(out: Path, seed: int = 0) -> Path:
    """A tandem-tiny model with random weights, exported exactly as ``tandem train`` exports."""
    from training.config import ModelConfig
    from training.export import export_state_dict
    from training.model import create_model, preprocess_config
    from training.model_config import resolve_model_config

    torch.manual_seed(seed)
    model_cfg = resolve_model_config(ModelConfig(name="tandem-tiny"))
    model = create_model(model_cfg)
    return export_state_dict(model.state_dict(), model_cfg, preprocess_config(model_cfg), out)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def tiny_index(tiny_export, synth_data, tmp_path_factory) -> Path:
    """A flat index of the synthetic test split (128 images), written by ``tandem index`` in chunks of 50."""
    from training.cli import main

    out = tmp_path_factory.mktemp("index") / "flat"
    assert main(["index", "--model", str(tiny_export), "--data", str(synth_data / "test"), "--out", str(out),
                 "--chunk-size", "50", "--batch-size", "32", "--device", "cpu"]) == 0
    return out
