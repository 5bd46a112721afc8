"""End to end: `tandem train --nproc 2` with DeepSpeed on gloo, checkpoints, resume, metrics."""

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import tandem
from training.distributed import (check_checkpoint_layout, consolidated_state_dict, convert_to_universal,
                                  zero_partitions)
from training.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards_with_damage(synth_data, tmp_path_factory) -> Path:
    """The synthetic train shards plus one shard with corrupt JPEGs and one truncated shard."""
    folder = tmp_path_factory.mktemp("damaged")
    for path in sorted((synth_data / "train").glob("*.tar")):
        shutil.copy(path, folder / path.name)
    source = sorted((synth_data / "test").glob("*.tar"))[0]
    with tarfile.open(source) as tar, tarfile.open(folder / "shard-00004.tar", "w") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.endswith(".jpg") and int(member.name[:9]) % 8 == 0:
                data = b"\xff\xd8\xff garbage"
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    whole = source.read_bytes()
    (folder / "shard-00005.tar").write_bytes(whole[: len(whole) // 3])
    return folder


def write_config(path: Path, shards: Path, synth: Path, run_dir: Path, **train) -> Path:
    train = {"zero_stage": 1, "checkpoint_every": 2, **train}
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items())
    path.write_text(f"""
[data]
train_shards = "{shards}/shard-{{00000..00005}}.tar"
val_shards = "{synth}/test/shard-{{00000..00001}}.tar"
classes = "{synth}/classes.json"
batch_size = 16
workers = 2
shuffle_buffer = 64

[optim]
lr = 0.005
warmup_steps = 2

[train]
run_dir = "{run_dir}"
steps = 6
{extra}
""")
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TRACE = {"TANDEM_TRACE_KEYS": "1"}


def key_trace(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """step -> the sample keys this rank trained on (written by the trainer under TANDEM_TRACE_KEYS)."""
    records = [json.loads(line) for line in (run_dir / f"keys.rank{rank}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # each step once, in order
    return {r["step"]: r["keys"] for r in records}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return consolidated_state_dict(run_dir / "checkpoints", tag)


def test_train_checkpoint_resume_equals_uninterrupted(tmp_path, synth_data, shards_with_damage):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    cfg = write_config(tmp_path / "full.toml", shards_with_damage, synth_data, full_dir)
    run = tandem("train", "--config", str(cfg), "--nproc", "2", env=TRACE)
    assert run.returncode == 0, run.stderr[-4000:]

    records = metrics(full_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "temperature", "logit_scale", "lr", "samples_per_s", "data_wait_s", "skipped_samples"} <= set(
        records[0])
    # temperature is T as loss.init_temperature sets it (0.07 at the start), logit_scale its inverse
    assert 0.05 < records[0]["temperature"] < 0.09 and records[0]["temperature"] * records[0]["logit_scale"] == (
        pytest.approx(1.0))
    assert records[-1]["skipped_samples"] > 0  # the damaged shards were skipped and counted, not fatal
    assert (full_dir / "config.toml").is_file() and (full_dir / "export" / "open_clip_model.safetensors").is_file()
    final_eval = json.loads((full_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert final_eval["step"] == 6 and final_eval["num_samples"] == 128
    kept = sorted(p.name for p in (full_dir / "checkpoints").glob("step*"))
    assert kept == ["step00000004", "step00000006"]  # keep_checkpoints = 2

    # the export, evaluated through open_clip, reproduces the trainer's own final evaluation
    ev = tandem("eval", "--model", str(full_dir / "export"), "--data", str(synth_data / "test"),
                "--classes", str(synth_data / "classes.json"), "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    exported_eval = json.loads(ev.stdout.strip().splitlines()[-1])
    for key in ("zero_shot_top1", "zero_shot_top5", "image_to_text_recall@5", "text_to_image_recall@5"):
        assert exported_eval[key] == pytest.approx(final_eval[key], abs=1e-6), key

    # interrupted at step 3, then resumed from the latest checkpoint
    cfg = write_config(tmp_path / "split.toml", shards_with_damage, synth_data, split_dir, stop_at=3)
    first = tandem("train", "--config", str(cfg), "--nproc", "2", env=TRACE)
    assert first.returncode == 0, first.stderr[-4000:]
    assert (split_dir / "checkpoints" / "latest").read_text().strip() == "step00000003"
    second = tandem("train", "--config", str(cfg), "--set", "train.stop_at=0", "--resume", "latest", "--nproc", "2",
                    env=TRACE)
    assert second.returncode == 0, second.stderr[-4000:]
    assert [r["step"] for r in metrics(split_dir)] == [1, 2, 3, 4, 5, 6]
    full, resumed = final_weights(full_dir), final_weights(split_dir)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name
    assert [r["loss"] for r in metrics(split_dir)][3:] == pytest.approx([r["loss"] for r in records][3:], abs=1e-6)
    # the same sample keys in the same order on every rank, the steps after the resume included
    for rank in range(2):
        full_keys, resumed_keys = key_trace(full_dir, rank), key_trace(split_dir, rank)
        assert list(full_keys) == list(resumed_keys) == [1, 2, 3, 4, 5, 6]
        assert all(len(keys) == 16 for keys in full_keys.values())
        for step in (4, 5, 6):
            assert resumed_keys[step] == full_keys[step], (rank, step)
    assert key_trace(full_dir, 0) != key_trace(full_dir, 1)  # each rank its own samples
    # the running count of skipped samples goes on from the checkpoint's, as in the uninterrupted run
    assert [r["skipped_samples"] for r in metrics(split_dir)] == [r["skipped_samples"] for r in records]

    # A restart of the finished run, its `latest` pointer lost (not copied, say): the newest checkpoint
    # is resumed, nothing is trained again, and the final evaluation is recorded once.
    (split_dir / "checkpoints" / "latest").unlink()
    logged = metrics(split_dir)
    again = tandem("train", "--config", str(cfg), "--set", "train.stop_at=0", "--resume", "latest", "--nproc", "2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming the newest checkpoint, step00000006" in again.stderr
    assert metrics(split_dir) == logged
    assert (split_dir / "checkpoints" / "latest").read_text().strip() == "step00000006"
    for name, weights in final_weights(split_dir).items():
        assert torch.equal(weights, resumed[name]), name
    evals = [json.loads(line) for line in (split_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [6] and evals[0]["num_samples"] == 128
    # a start without --resume does not train over the run's checkpoints
    fresh = tandem("train", "--config", str(cfg))
    assert fresh.returncode == 2 and fresh.stderr.strip().splitlines() == [
        f"tandem: error: train.run_dir {split_dir} holds a run's checkpoints (newest step00000006): resume it with "
        "--resume latest, or train into a new train.run_dir"]


def _short_config(tmp_path: Path, synth_data: Path, run_dir: Path) -> Path:
    path = tmp_path / f"{run_dir.name}.toml"
    path.write_text(f"""
[data]
train_shards = "{synth_data}/train/shard-{{00000..00003}}.tar"
batch_size = 8
workers = 0
[train]
run_dir = "{run_dir}"
steps = 2
export = false
""")
    return path


def test_standard_environment_variables_alone(tmp_path, synth_data):
    """How Kubernetes starts it: no launcher, just RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, and
    --resume latest. Here the pod is a restart of one killed before its first checkpoint: the steps that
    attempt logged are trained again, and each is logged once."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    run_dir = tmp_path / "env-run"
    cfg = _short_config(tmp_path, synth_data, run_dir)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3)))
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "training.cli", "train", "--config", str(cfg), "--resume", "latest"],
                         cwd=ROOT,
                         env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "no checkpoint in" in outputs[0][1] and "starting from scratch" in outputs[0][1]
    assert [(r["step"], r["loss"] == 99.0) for r in metrics(run_dir)] == [(1, False), (2, False)]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000002"


def test_cpu_process_group_builds_no_deepspeed_op(tmp_path):
    """On CPU DeepSpeed would JIT-compile its inference-only shared-memory all-reduce when the process
    group forms (minutes on a fresh install, and a compiler in the image). With the extensions folder
    made unusable, any build attempt fails the process; init must form the group without one."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    script = ("from training import distributed\n"
              "distributed.init()\n"
              "import deepspeed.comm.comm as comm\n"
              "print('shm op:', comm.cdb.shm_comm_op, 'world:', distributed.world_size())\n"
              "distributed.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(blocker / "extensions")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "shm op: None world: 1"


def test_deepspeed_launcher(tmp_path, synth_data):
    import os
    import subprocess
    import sys
    from pathlib import Path as P

    from tests.conftest import ROOT, free_port

    run_dir = tmp_path / "ds-run"
    cfg = _short_config(tmp_path, synth_data, run_dir)
    launcher = P(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), "--module", "training.cli", "train", "--config",
                           str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(metrics(run_dir)) == 2


def test_resume_applies_the_configs_optimizer_settings_and_names_what_it_cannot_change(tmp_path, synth_data,
                                                                                      shards_with_damage):
    """DeepSpeed restores each group's lr and weight decay, and the schedule its base lr, with the
    checkpoint; a resume applies the config's instead (as open_clip's does), so a resume at an lr of
    1e-30 leaves every weight where the checkpoint had it (at the saved lr of 0.005 they all move)."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", shards_with_damage, synth_data, run_dir, stop_at=3, keep_checkpoints=4)
    first = tandem("train", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    second = tandem("train", "--config", str(cfg), "--set", "train.stop_at=0", "--set", "optim.lr=1e-30",
                    "--set", "optim.weight_decay=0.0", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "lr 0.005 -> 1e-30, weight_decay 0.1 -> 0.0" in second.stderr
    lrs = {r["step"]: r["lr"] for r in metrics(run_dir)}
    # Each step logs the lr it trained at: warmup 1/2, 2/2, then cosine over the 4 steps after it.
    cosine = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert [lrs[1], lrs[2], lrs[3]] == pytest.approx([0.0025, 0.005, 0.005 * cosine[0]], rel=1e-9)
    assert [lrs[4], lrs[5], lrs[6]] == pytest.approx([1e-30 * c for c in cosine[1:]], rel=1e-9)
    saved = consolidated_state_dict(run_dir / "checkpoints", "step00000003")
    final = final_weights(run_dir)
    weights = [k for k in saved if "running_" not in k and "num_batches" not in k]
    assert len(weights) > 20 and [k for k in weights if not torch.equal(saved[k], final[k])] == []

    # What a resume cannot change is one line naming the setting, not DeepSpeed's traceback.
    folder = run_dir / "checkpoints" / "step00000003"
    check_checkpoint_layout(folder, 2, 1)  # stages 1 and 2 share the layout
    with pytest.raises(UserError, match="written with ZeRO stage 1 or 2 and this run uses stage 0: resume"):
        check_checkpoint_layout(folder, 0, 1)
    with pytest.raises(UserError, match="written with ZeRO stage 1 or 2 and this run uses stage 3"):
        check_checkpoint_layout(folder, 3, 1)
    assert check_checkpoint_layout(folder, 1, 2) and not check_checkpoint_layout(folder, 1, 1)  # re-partition?
    with pytest.raises(UserError, match=r'written in fp32 and this run trains in bf16: resume with train.precision = "fp32"'):
        check_checkpoint_layout(folder, 1, 1, bf16=True)
    run_files = {name: (run_dir / name).read_bytes() for name in ("config.toml", "model_cfg.json")}
    other = tandem("train", "--config", str(cfg), "--set", "train.stop_at=0", "--set", "loss.impl=siglip",
                   "--resume", "step00000003")
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    # the refused resume leaves the run describing the model its checkpoints hold
    assert {name: (run_dir / name).read_bytes() for name in run_files} == run_files
    assert other.stderr.strip().splitlines()[-1] == (
        "tandem: error: checkpoint step00000003 does not fit this model (was it written with another model.*, "
        'loss.impl or method.*?): Missing key(s) in state_dict: "logit_bias".')

    # A checkpoint file cut off (a disk that filled up, a copy stopped part-way) is one line too.
    newest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    part = next(newest.glob("*zero_pp_rank_0_*optim_states.pt"))
    part.write_bytes(part.read_bytes()[:4096])
    cut = tandem("train", "--config", str(cfg), "--resume", "latest")
    assert cut.returncode == 2 and "Traceback" not in cut.stderr, cut.stderr[-3000:]
    assert cut.stderr.strip().splitlines()[-1] == (
        f"tandem: error: checkpoint {newest.name} cannot be read: {part.name} is cut off or not a checkpoint file; "
        "resume from an earlier one (--resume step00000004)")


def zero_state(folder: Path) -> dict[tuple[int, str], torch.Tensor]:
    """Per param group, the fp32 weights, Adam moments and Adam step of a ZeRO 1/2 checkpoint, the
    processes' parts joined in rank order (each file holds one part: the weights without padding,
    the moments with it; every part has the same step)."""
    files = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    state = {}
    for group in range(len(parts[0]["single_partition_of_fp32_groups"])):
        weights = [part["single_partition_of_fp32_groups"][group] for part in parts]
        state[group, "fp32"] = torch.cat(weights)
        for key in ("exp_avg", "exp_avg_sq"):
            state[group, key] = torch.cat([part["base_optimizer_state"]["state"][group][key][: w.numel()]
                                           for part, w in zip(parts, weights)])
        steps = [part["base_optimizer_state"]["state"][group]["step"] for part in parts]
        assert all(torch.equal(step, steps[0]) for step in steps)
        state[group, "step"] = steps[0]
    return state


def universal_state(folder: Path, out: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Per parameter, the fp32 weights, Adam moments and step of a ZeRO checkpoint folder at any world
    size, each whole: DeepSpeed's universal-checkpoint converter joins the processes' parts."""
    convert_to_universal(folder, out)
    state = {}
    for param in sorted(p for p in (out / "zero").iterdir() if p.is_dir()):
        for file in param.glob("*.pt"):
            value = torch.load(file, map_location="cpu", weights_only=False)
            value = value["param"] if isinstance(value, dict) else value
            state[param.name, file.stem] = value if torch.is_tensor(value) else torch.tensor(value)
    return state


def checkpoint_folders(run_dir: Path) -> list[str]:
    """Every folder in the checkpoint directory, hidden ones (a save's or a resize's staging) included."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def module_states(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_resume_with_another_number_of_processes_repartitions_the_zero_state(tmp_path, synth_data,
                                                                               shards_with_damage):
    """Under ZeRO 1-3 each process keeps one part of the fp32 weights and the optimizer state; a
    resume with another number of processes re-partitions them. A checkpoint written by 1 process,
    resumed by 2 and saved at once, then resumed by 1 again, holds the same fp32 master weights, Adam
    moments and steps, bf16 module weights and BatchNorm statistics each time. Saving over the old folder
    of that step replaces it whole (written into, the old process's extra part would stay)."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", shards_with_damage, synth_data, run_dir, stop_at=3,
                       precision="bf16", checkpoint_every=1, keep_checkpoints=3)
    first = tandem("train", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run_dir / "checkpoints" / "step00000003"
    state, module = zero_state(folder), module_states(folder)
    earlier = zero_state(run_dir / "checkpoints" / "step00000002")
    assert state.keys() == earlier.keys() and not torch.equal(state[1, "exp_avg"], earlier[1, "exp_avg"])
    assert any("running_mean" in k for k in module) and state[1, "fp32"].numel() > 10**6

    for nproc in (2, 1):
        run = tandem("train", "--config", str(cfg), "--nproc", str(nproc), "--resume", "latest",
                     "--set", "train.steps=3", "--set", "train.export=false", "--set", 'data.val_shards=""')
        assert run.returncode == 0, run.stderr[-3000:]
        written = {2: "1 process", 1: "2 processes"}[nproc]
        assert f"was written by {written} and this run has {nproc}: its ZeRO partitions" in run.stderr
        assert zero_partitions(folder) == nproc
        resumed = zero_state(folder)
        assert resumed.keys() == state.keys()
        assert [k for k in state if not torch.equal(resumed[k], state[k])] == []
        again = module_states(folder)
        assert [k for k in module if not torch.equal(again[k], module[k])] == []
        assert checkpoint_folders(run_dir) == [
            "step00000001", "step00000002", "step00000003"]  # no staging or replaced folder left behind

    # Resumed from an earlier checkpoint, the run replaces step 2 and keeps 2 checkpoints of its own;
    # step 3, left by the run it took over from, is neither pruned nor counted (it was: step 1 went).
    back = tandem("train", "--config", str(cfg), "--resume", "step00000001", "--set", "train.stop_at=2",
                  "--set", "train.keep_checkpoints=2")
    assert back.returncode == 0, back.stderr[-3000:]
    assert ("checkpoints newer than the one resumed (step00000002, step00000003) are from the run it took over "
            "from: each is replaced when this run saves at its step") in back.stderr
    assert checkpoint_folders(run_dir) == [
        "step00000001", "step00000002", "step00000003"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000002"
    replayed = zero_state(run_dir / "checkpoints" / "step00000002")  # the same data and weights: the same step
    assert [k for k in earlier if not torch.equal(replayed[k], earlier[k])] == []

    # Resumed from step 1 again, diverging before any save of its own: the newest checkpoint of this
    # run is step 1 (steps 2 and 3 belong to the run it took over from), and latest names step 1, so
    # a restart does not go back to that other run.
    spoilt = tandem("train", "--config", str(cfg), "--resume", "step00000001", "--set", "optim.lr=1e30",
                    "--set", "train.checkpoint_every=3")
    assert spoilt.returncode == 2, spoilt.stderr[-3000:]
    assert "; the newest checkpoint (step00000001) predates it" in spoilt.stderr.splitlines()[-1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000001"


def test_zero3_resume_with_another_number_of_processes(tmp_path, synth_data, shards_with_damage):
    """ZeRO 3 partitions each parameter; a resume with another number of processes goes through
    DeepSpeed's universal checkpoint and restores the same fp32 weights (read back by DeepSpeed's own
    consolidation), Adam moments of every parameter and BatchNorm statistics, and leaves no staging
    folder behind."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", shards_with_damage, synth_data, run_dir, stop_at=1, zero_stage=3,
                       checkpoint_every=1)
    first = tandem("train", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run_dir / "checkpoints" / "step00000001"
    weights = consolidated_state_dict(run_dir / "checkpoints", "step00000001")
    optimizer = universal_state(folder, tmp_path / "universal-before")
    buffers = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["module"]
    buffers = {k: v for k, v in buffers.items() if "running_" in k}
    assert len(buffers) > 10 and len(weights) > 50

    # The final evaluation reads one held-out shard with two ranks: rank 1 has none, and still joins
    # each forward that ZeRO 3 gathers the parameters for.
    one_shard = f"{synth_data}/test/shard-00000.tar"
    run = tandem("train", "--config", str(cfg), "--nproc", "2", "--resume", "latest", "--set", "train.steps=1",
                 "--set", "train.export=false", "--set", f"data.val_shards={json.dumps(one_shard)}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["num_samples"] == 64
    assert "was written by 1 process and this run has 2: its ZeRO partitions" in run.stderr
    assert "MPU" not in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in folder.glob("zero_pp_rank_*_model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    again = consolidated_state_dict(run_dir / "checkpoints", "step00000001")
    assert again.keys() == weights.keys() and [k for k in weights if not torch.equal(again[k], weights[k])] == []
    # the Adam moments and step of every parameter, re-partitioned for 2 processes, are the ones saved by 1
    resized = universal_state(folder, tmp_path / "universal-after")
    assert resized.keys() == optimizer.keys() and len({name for name, _ in optimizer}) > 50
    assert {kind for _, kind in optimizer} == {"fp32", "exp_avg", "exp_avg_sq"}
    assert [k for k in optimizer if not torch.equal(resized[k], optimizer[k])] == []
    assert any(v.abs().sum() > 0 for (_, kind), v in optimizer.items() if kind == "exp_avg")  # a step was taken
    for rank in (0, 1):
        saved = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert [k for k in buffers if not torch.equal(saved[k], buffers[k])] == []
    assert checkpoint_folders(run_dir) == ["step00000001"]

    # Another model through the same route is the one line a same-size resume gives, and leaves nothing.
    other = tandem("train", "--config", str(cfg), "--resume", "latest", "--set", "loss.impl=siglip")
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert other.stderr.strip().splitlines()[-1] == (
        "tandem: error: checkpoint step00000001 does not fit this model (was it written with another model.*, "
        "loss.impl or method.*?): missing ['logit_bias'], unexpected []")
    assert checkpoint_folders(run_dir) == ["step00000001"]


def test_each_rank_and_step_draws_its_own_dropout(monkeypatch):
    """torch's generators are seeded from (seed, rank, step) before each step: ranks draw different
    dropout masks (all were seeded alike), and a resumed run draws what the uninterrupted one did."""
    from types import SimpleNamespace

    from training import distributed
    from training.trainer import Trainer

    def draw(rank: int, step: int, seed: int = 0) -> torch.Tensor:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        Trainer._seed_step(SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seed=seed)), step=step))
        return torch.nn.functional.dropout(torch.ones(64), 0.5)

    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(1, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(0, 5, seed=1))
