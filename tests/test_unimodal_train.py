"""`tandem train` with an image-only method, end to end through the CLI: metrics with the collapse
monitor, kNN / linear evaluation, backbone export, and resume == uninterrupted (queue and momentum
encoder included); a bad method name is a one-line error."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tandem


def write_config(path: Path, synth: Path, run_dir: Path, **train) -> Path:
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items())
    path.write_text(f"""
[data]
train_shards = "{synth}/train/shard-{{00000..00003}}.tar"
val_shards = "{synth}/test/shard-00000.tar"
classes = "{synth}/classes.json"
batch_size = 8
workers = 0

[optim]
warmup_steps = 1

[train]
run_dir = "{run_dir}"
steps = 4
checkpoint_every = 2
{extra}

[method]
name = "moco"
queue_size = 20
proj_hidden = 32
proj_dim = 16
eval_train_samples = 64
linear_steps = 20
""")
    return path


def module_state(run_dir: Path) -> dict[str, torch.Tensor]:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.slow
def test_moco_train_evaluate_export_and_resume(tmp_path, synth_data):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    run = tandem("train", "--config", str(write_config(tmp_path / "full.toml", synth_data, full_dir)))
    assert run.returncode == 0, run.stderr[-4000:]
    assert "method.shuffle_bn has no effect in one process" in run.stderr  # one process: nothing to shuffle over
    records = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "embedding_std", "effective_rank", "collapsed", "momentum"} <= set(records[0])
    final = json.loads((full_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 4 and final["num_samples"] == 64 and 0 <= final["knn_top1"] <= 1
    assert (full_dir / "export" / "backbone.safetensors").is_file()
    assert "method" in (full_dir / "config.toml").read_text()

    cfg = write_config(tmp_path / "split.toml", synth_data, split_dir, stop_at=2)
    first = tandem("train", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-4000:]
    # stop_at at the last step is no stop: the run finishes, evaluates and exports
    second = tandem("train", "--config", str(cfg), "--set", "train.stop_at=4", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-4000:]
    assert json.loads((split_dir / "eval.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert (split_dir / "export" / "backbone.safetensors").is_file()
    full, resumed = module_state(full_dir), module_state(split_dir)
    assert {"queue.keys", "queue.ptr", "calls"} <= set(full) and any(k.startswith("key_backbone.") for k in full)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.allclose(full[name].float(), resumed[name].float(), atol=1e-6), name
    assert int(full["queue.ptr"]) == (4 * 2 * 8) % 20  # 4 steps of 2 views x 8 keys, wrapped


@pytest.mark.slow
def test_bf16_byol_resume_equals_uninterrupted(tmp_path, synth_data):
    """Under bf16 the target network follows an fp32 EMA master (``ema_update_``); the checkpoint
    carries it, so a resumed run's weights equal an uninterrupted run's bit for bit, target included
    (rebuilt from the bf16 target instead, 100-odd tensors differed by a bf16 unit)."""
    runs = {}
    for name, extra in (("full", {}), ("split", {"stop_at": 2})):
        cfg = write_config(tmp_path / f"{name}.toml", synth_data, tmp_path / name, precision="bf16", **extra)
        cfg.write_text(cfg.read_text().replace('name = "moco"', 'name = "byol"'))
        runs[name] = cfg
    full = tandem("train", "--config", str(runs["full"]))
    assert full.returncode == 0, full.stderr[-4000:]
    first = tandem("train", "--config", str(runs["split"]))
    assert first.returncode == 0, first.stderr[-4000:]
    tag = (tmp_path / "split" / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(tmp_path / "split" / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(saved["ema_fp32"]) == {"target_backbone", "target_projector"}
    second = tandem("train", "--config", str(runs["split"]), "--set", "train.stop_at=0", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-4000:]
    uninterrupted, resumed = module_state(tmp_path / "full"), module_state(tmp_path / "split")
    assert uninterrupted["target_backbone.conv1.0.weight"].dtype == torch.bfloat16

    # The fp32 export holds the fp32 masters, not the module's bf16 copies widened.
    from safetensors.torch import load_file

    from training.distributed import consolidated_state_dict

    exported = load_file(str(tmp_path / "full" / "export" / "backbone.safetensors"))
    tag = (tmp_path / "full" / "checkpoints" / "latest").read_text().strip()
    masters = consolidated_state_dict(tmp_path / "full" / "checkpoints", tag)
    weights = [k for k in exported if "running_" not in k and "num_batches" not in k]
    assert len(weights) > 20 and all(exported[k].dtype == torch.float32 for k in exported)
    assert [k for k in weights if not torch.equal(exported[k], masters[f"backbone.{k}"])] == []
    assert any(not torch.equal(exported[k], exported[k].bfloat16().float()) for k in weights)
    assert uninterrupted.keys() == resumed.keys()
    assert [k for k in uninterrupted if not torch.equal(uninterrupted[k], resumed[k])] == []


def test_unknown_method_is_a_one_line_error(tmp_path, synth_data):
    cfg = write_config(tmp_path / "bad.toml", synth_data, tmp_path / "run")
    proc = tandem("train", "--config", str(cfg), "--set", "method.name=simclrr")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tandem: error: method.name must be one of clip, simclr, moco, moco_v3, byol, simsiam, barlow_twins, "
        "swav, supcon, got 'simclrr'"]


@pytest.mark.slow
def test_a_wrong_label_key_stops_the_run_before_it_trains(tmp_path, synth_data):
    cfg = write_config(tmp_path / "bad.toml", synth_data, tmp_path / "run")
    proc = tandem("train", "--config", str(cfg), "--set", "method.name=simclr", "--set", "method.label_key=shapes")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tandem: error: no sample of the first 16 in {synth_data}/test/shard-00000.tar has "
                           "'shapes' in its .json (method.label_key; the keys there: ") and "shape" in last, last
    assert not (tmp_path / "run" / "checkpoints").exists() and "Traceback" not in proc.stderr


def test_method_config_keys_are_checked():
    from training import config as config_mod
    from training.errors import UserError

    cfg = config_mod.load(None, ["method.name=byol", "method.momentum=0.996"])
    assert cfg.method.name == "byol" and cfg.method.momentum == 0.996
    with pytest.raises(UserError, match="unknown config key 'method.knn_kk'"):
        config_mod.load(None, ["method.knn_kk=3"])
    with pytest.raises(UserError, match="zero_stage"):
        config_mod.load(None, ["method.name=simclr", "train.zero_stage=3", "data.train_shards=x"]).validate()
