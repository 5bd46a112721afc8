"""A user's mistake gets one clear line on stderr and exit status 2, never a traceback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port, tandem
from training.checks import check_inputs
from training.config import load
from training.errors import UserError
from training.metrics import MetricsLogger, Throughput


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("tandem: error:") and needle in lines[-1], proc.stderr
    assert len([line for line in lines if line.startswith("tandem: error:")]) == 1


@pytest.fixture
def good_config(tmp_path, synth_data):
    def write(extra: str = "", shards: str | None = None):
        shards = shards or f"{synth_data}/train/shard-{{00000..00003}}.tar"
        path = tmp_path / "c.toml"
        path.write_text(f'[data]\ntrain_shards = "{shards}"\n{extra}\n')
        return str(path)
    return write


def test_missing_shard(good_config, tmp_path):
    proc = tandem("train", "--config", good_config(shards=f"{tmp_path}/nothing-{{0..9}}.tar"), "--nproc", "2")
    assert_one_line_error(proc, "shard not found")


def test_empty_shard(good_config, tmp_path):
    (tmp_path / "e.tar").write_bytes(b"")
    assert_one_line_error(tandem("train", "--config", good_config(shards=str(tmp_path / "e.tar"))), "shard is empty")


def test_empty_shard_list(good_config):
    assert_one_line_error(tandem("train", "--config", good_config(shards=" ")), "no shards given")


def test_unknown_config_key(good_config):
    assert_one_line_error(tandem("train", "--config", good_config("batchsize = 3")), "data.batchsize")


def test_out_of_range_knob_fails_before_training(good_config):
    proc = tandem("train", "--config", good_config(), "--set", "method.name=byol", "--set", "method.knn_k=0")
    assert_one_line_error(proc, "method.knn_k must be >= 1, got 0")


@pytest.mark.parametrize("args, needle", [
    (["demo", "--nproc", "-1"], "argument --nproc: must be >= 1, got -1"),
    (["serve", "--model", "m", "--port", "70000"], "argument --port: must be 0 to 65535, got 70000"),
    (["index", "--model", "m", "--data", "d", "--out", "o", "--hnsw-m", "0"], "argument --hnsw-m: must be >= 2"),
    (["eval", "--model", "m", "--data", "d", "--classes", "c", "--batch-size", "x"], "expected an integer, got 'x'"),
    (["data", "shards", "--input", "i", "--out", "o", "--quality", "500"], "argument --quality: must be 1 to 100"),
    (["data", "synth", "--out", "d", "--train-samples", "0"], "argument --train-samples: must be >= 1, got 0"),
])
def test_out_of_range_flags_are_usage_errors(args, needle):
    proc = tandem(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tandem {' '.join(args[:2 if args[0] == 'data' else 1])}: error:") and needle in last, \
        proc.stderr


def test_missing_config_file(tmp_path):
    assert_one_line_error(tandem("train", "--config", str(tmp_path / "no.toml")), "config file not found")


def test_unknown_model(good_config):
    assert_one_line_error(tandem("train", "--config", good_config(), "--set", 'model.name="ViT-Q-99"'), "unknown model")


def test_eval_and_export_of_wrong_directories(tmp_path, synth_data, capsys):
    assert_one_line_error(tandem("eval", "--model", str(tmp_path), "--data", str(synth_data / "test"),
                                 "--classes", str(synth_data / "classes.json")), "not an exported model")
    assert_one_line_error(tandem("export", "--run", str(tmp_path)), "not a Tandem run directory")
    (tmp_path / "model_cfg.json").write_text("{}")
    assert_one_line_error(tandem("export", "--run", str(tmp_path)), "no checkpoint found")
    from safetensors.torch import save_file

    from training.cli import main

    # An export without its weights would be scored at open_clip's random initialisation: refused,
    # as are a config that names no model and weights whose header does not read.
    data = ["--data", str(synth_data / "test")]
    (tmp_path / "open_clip_config.json").write_text("{}")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"\x08\x00\x00")
    for needle in ("open_clip_config.json is not an export's config", "has no open_clip_model.safetensors",
                   "open_clip_model.safetensors is not a readable safetensors file"):
        if "has no" in needle:
            (tmp_path / "open_clip_config.json").write_text(json.dumps(
                {"model_cfg": {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}}))
            moved = (tmp_path / "open_clip_model.safetensors").rename(tmp_path / "aside")
        assert main(["eval", "--model", str(tmp_path), *data]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("tandem: error: ") and needle in last, (needle, last)
        if "has no" in needle:
            moved.rename(tmp_path / "open_clip_model.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "open_clip_model.safetensors"))
    assert_one_line_error(tandem("eval", "--model", str(tmp_path), "--data", str(tmp_path / "nowhere-{0..1}.tar"),
                                 "--classes", str(synth_data / "classes.json")), "nowhere-0.tar")
    assert_one_line_error(tandem("eval", "--model", str(tmp_path), "--data", str(synth_data / "test"),
                                 "--classes", str(tmp_path / "missing.json")), "classes file not found")
    # a checkpoint folder that holds no checkpoint, and output folders that are files (in process: the
    # same main() the console script runs, without paying a subprocess's imports per case)

    (tmp_path / "checkpoints" / "empty").mkdir(parents=True)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [(["export", "--run", str(tmp_path), "--tag", "empty"], "holds no model states"),
             (["export", "--run", str(tmp_path), "--tag", "."], "holds no model states"),
             (["data", "synth", "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
             (["data", "synth", "--out", str(a_file / "x")], f"--out {a_file / 'x'} cannot be written"),
             (["demo", "--out", str(a_file)], f"--out {a_file} is a file, not a folder")]
    for args, needle in cases:
        assert main(args) == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("tandem: error: ") and needle in last, (args, last)


def test_data_synth_writes_the_framing_asked_for(tmp_path):
    proc = tandem("data", "synth", "--out", str(tmp_path), "--train-samples", "8", "--test-samples", "4",
                  "--framing", "object")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "classes.json").read_text())["framing"] == "object"


def test_metrics_logger_writes_jsonl_and_serves_prometheus(tmp_path):
    port = free_port()
    logger = MetricsLogger(tmp_path, total_steps=10, port=port)
    try:
        logger.log(3, {"loss": 1.5, "temperature": 20.0, "lr": 1e-3, "samples_per_s": 99.0, "data_wait_s": 0.01},
                   skipped=2)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        logger.close()
    assert "tandem_train_loss 1.5" in body and "tandem_train_step 3.0" in body
    assert "tandem_train_skipped_samples_total 2.0" in body
    # a value never logged is no series, not a 0 that reads as "collapsed" (CLIP has no collapse monitor)
    assert "tandem_train_embedding_std" not in body and "tandem_train_collapsed" not in body
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["temperature"] == 20.0


def test_another_nodes_first_process_keeps_the_metrics_port_answering(tmp_path, caplog):
    """Under elasticity every pod is scraped, as any may hold rank 0: the others answer with their
    rank alone (no training gauge, no metrics.jsonl), so no target shows as down."""
    port = free_port()
    logger = MetricsLogger(tmp_path, total_steps=10, port=port, enabled=False, rank=3)
    try:
        logger.log(1, {"loss": 1.0})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        # a second process on the port (two "nodes" on one host) only warns: the endpoint is a courtesy
        other = MetricsLogger(tmp_path, total_steps=10, port=port, enabled=False, rank=5)
        other.log(1, {"loss": 1.0})
        other.close()
    finally:
        logger.close()
    assert "tandem_train_rank 3.0" in body and "tandem_train_loss" not in body and "tandem_train_step" not in body
    assert not (tmp_path / "metrics.jsonl").exists()
    assert "cannot be served by rank 5" in caplog.text
    with socket.socket() as s:  # closed: nothing listens on the port any more (reuse: the scrape's TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_throughput_covers_every_step_since_the_last_reading():
    """A log line every 4 steps reports the rate of all 4 (a step's own wall time on a GPU counts only
    queued kernels); a checkpoint's or an evaluation's time is left out by restarting the window."""
    now = [0.0]
    meter = Throughput(64, clock=lambda: now[0])  # 64 samples a step
    for seconds in (3.0, 0.5, 0.25, 0.25):  # a slow first step, then fast ones; read after the 4th
        now[0] += seconds
        meter.step()
    assert meter.read() == 4 * 64 / 4.0  # not 64 / 0.25, the last step alone
    now[0] += 1.0
    meter.step()
    now[0] += 30.0  # a checkpoint
    meter.restart()
    now[0] += 0.5
    meter.step()
    assert meter.read() == 64 / 0.5


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Killed at step 5 after a checkpoint at step 4, a run resumes at 4 and trains step 5 again: the
    earlier record of step 5 (and a line cut off by the kill) go, so each step is logged once."""
    first = MetricsLogger(tmp_path, total_steps=10, port=0)
    values = {"temperature": 20.0, "samples_per_s": 99.0}
    for step in range(1, 6):
        first.log(step, {"loss": float(step), **values})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')
    resumed = MetricsLogger(tmp_path, total_steps=10, start_step=4, port=0)
    resumed.log(5, {"loss": 0.5, **values})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 0.5)]


def test_a_metrics_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        with pytest.raises(UserError, match=f"train.metrics_port {held.getsockname()[1]} cannot be served"):
            MetricsLogger(tmp_path, total_steps=10, port=held.getsockname()[1])


def test_run_dir_weights_and_text_tower_mistakes_fail_before_training(tmp_path, synth_data):
    shards = f'data.train_shards="{synth_data}/train/shard-{{00000..00003}}.tar"'
    (tmp_path / "file").write_text("")
    for run_dir, needle in ((tmp_path / "file", "is a file, not a folder"),
                            (tmp_path / "file" / "run", "is not a writable folder")):
        with pytest.raises(UserError, match=needle):
            check_inputs(load(None, [shards, f'train.run_dir="{run_dir}"']))
    with pytest.raises(UserError, match="data.train_weights must be finite"):
        check_inputs(load(None, [f'data.train_shards="{synth_data}/train/shard-00000.tar::{synth_data}/train/'
                                 'shard-00001.tar"', 'data.train_weights="inf::1"']))
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 64}))
    check_inputs(load(None, [shards, f'model.hf_text_model="{tower}"', "model.context_length=64"]))
    with pytest.raises(UserError, match="model.context_length 128 exceeds the 64 positions"):
        check_inputs(load(None, [shards, f'model.hf_text_model="{tower}"', "model.context_length=128"]))


def test_the_demo_refuses_the_keys_it_sets_itself(tmp_path):
    from training.demo import DEMO_CONFIG, train_on_synthetic

    proc = tandem("demo", "--out", str(tmp_path / "demo"), "--set", "train.export=false")
    assert_one_line_error(proc, "tandem demo sets train.export itself")
    for key in ("train.run_dir=/tmp/x", "train.stop_at=3", "method.name=simclr"):
        with pytest.raises(UserError, match=f"tandem demo sets {key.partition('=')[0]} itself"):
            train_on_synthetic(tmp_path / "demo", DEMO_CONFIG, nproc=2, train_samples=8, test_samples=4,
                               overrides=[key], framing="scene")
    assert not (tmp_path / "demo").exists()


def test_the_demo_regenerates_a_dataset_of_other_sizes(tmp_path, capsys):
    from training.demo import ensure_dataset

    ensure_dataset(tmp_path, 12, 6, framing="object")
    ensure_dataset(tmp_path, 12, 6, framing="object")
    assert "using the dataset" in capsys.readouterr().out
    ensure_dataset(tmp_path, 16, 6, framing="object")
    assert "regenerating" in capsys.readouterr().out
    assert sum(json.loads((tmp_path / "train" / "sizes.json").read_text()).values()) == 16


def test_inputs_are_checked_without_the_heavy_imports(synth_data):
    """`tandem train --nproc N` checks in the launching process; torch & co would cost ~15 s there."""
    script = """
import sys
from training.checks import check_inputs
from training.config import load
from training.launch import run_local
data = sys.argv[1]
for name in ("tandem-tiny", "ViT-B-32"):
    check_inputs(load(None, [f'data.train_shards="{data}/train/shard-{{00000..00003}}.tar"',
                             f'data.val_shards="{data}/test/shard-{{00000..00001}}.tar"',
                             f'data.classes="{data}/classes.json"', f'model.name="{name}"']))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "open_clip", "webdataset", "deepspeed", "numpy"})
print("heavy:", heavy)
import numpy  # the check itself can fail: an import is seen
print("control:", "numpy" in {m.split(".")[0] for m in sys.modules})
"""
    proc = subprocess.run([sys.executable, "-c", script, str(synth_data)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy: []" in proc.stdout and "control: True" in proc.stdout, proc.stdout


def test_eval_checks_its_inputs_without_the_heavy_imports(tmp_path, synth_data):
    """A wrong --data beside a good export is one line at once: the export's weights are checked by
    their header alone (safetensors' "pt" framework would import torch for it)."""
    from tests.scripts.serving_fixtures import make_export

    export = make_export(tmp_path / "export")
    script = """
import sys
from training.cli import main
code = main(["eval", "--model", sys.argv[1], "--data", sys.argv[2]])
print("code", code, "heavy:", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "open_clip", "deepspeed"}))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(export), str(tmp_path / "no-such-data")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "code 2 heavy: []" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.startswith("tandem: error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_model_names_resolve_as_open_clip_resolves_them():
    """Every name open_clip knows (Tandem's configs registered in front) gives the same config."""
    import open_clip

    from training.model import register_configs
    from training.model_config import named_model_config

    register_configs()
    names = open_clip.list_models()
    assert "tandem-tiny" in names and "ViT-B-32" in names
    for name in names:
        assert named_model_config(name) == open_clip.get_model_config(name), name
    assert named_model_config("ViT-Q-99") is None


def test_model_configs_that_cannot_build_are_one_line(tmp_path, synth_data):
    from training.config import ModelConfig
    from training.model_config import resolve_model_config

    # offline, as CI is: the hub client's retries would take half a minute otherwise
    proc = tandem("train", "--set", f'data.train_shards="{synth_data}/train/shard-00000.tar"',
                  "--set", "model.name=hf-hub:nobody/nothing", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "tandem: error: cannot read the config of hf-hub:nobody/nothing ("), proc.stderr[-2000:]
    (tmp_path / "m.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"layers": 2}, "text_cfg": {}}))
    with pytest.raises(UserError, match="needs vision_cfg.image_size"):
        resolve_model_config(ModelConfig(name=str(tmp_path / "m.json")))


def test_processes_per_node_follow_the_gpus():
    """On a GPU node each local process takes the GPU of its LOCAL_RANK: the demo starts one per GPU
    (at most 2), and asking for more processes than GPUs is a one-line error, not a CUDA crash in rank 1."""
    from training.launch import check_nproc, default_nproc
    from training.errors import UserError

    assert [default_nproc(gpus, 2) for gpus in (0, 1, 2, 8)] == [2, 1, 2, 2]
    for nproc, gpus in ((2, 0), (1, 1), (2, 2), (4, 8)):
        check_nproc(nproc, gpus)
    with pytest.raises(UserError, match=r"--nproc 2 starts one process per GPU, but 1 GPU is visible: use --nproc 1"):
        check_nproc(2, 1)
    with pytest.raises(UserError, match="but 4 GPUs are visible: use --nproc 4"):
        check_nproc(8, 4)


def test_a_diverging_run_stops_in_one_line_and_saves_nothing_spoilt(good_config, tmp_path):
    """An absurd learning rate drives the weights to NaN within a few steps: every rank stops with one
    line (printed once, not once per rank), the checkpoints from before stay, the newest of them is
    still `latest` with finite weights, and no NaN reaches the metrics."""
    import re

    import torch

    run_dir = tmp_path / "run"
    extra = (f'batch_size = 16\n[train]\nrun_dir = "{run_dir}"\nsteps = 8\nlog_every = 1\ncheckpoint_every = 1\n'
             "keep_checkpoints = 8\n[optim]\nlr = 1e30\nwarmup_steps = 0\n")
    proc = tandem("train", "--config", good_config(extra), "--nproc", "2")
    assert_one_line_error(proc, "training diverged: the loss or the weights became NaN or infinite by step")
    bad_step = int(re.search(r"infinite by step (\d+);", proc.stderr).group(1))
    kept = sorted(p.name for p in run_dir.glob("checkpoints/step*"))
    assert 1 <= bad_step < 8 and kept == [f"step{s:08d}" for s in range(1, bad_step)], (bad_step, kept)
    if kept:
        assert f"the newest checkpoint ({kept[-1]}) predates it" in proc.stderr
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == kept[-1]
        states = torch.load(run_dir / "checkpoints" / kept[-1] / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)
        assert all(torch.isfinite(t).all() for t in states["module"].values() if t.is_floating_point())
    else:
        assert "no checkpoint was written" in proc.stderr
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or "NaN" not in metrics.read_text()


def test_a_failed_rank_ends_the_launch_in_one_line_after_its_own_output(tmp_path):
    """The torchrun that `--nproc N` starts: a rank's crash keeps its own traceback, and the agent adds
    one line, not its ChildFailedError traceback and banner; a rank's user error (exit 2) adds nothing."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    raise RuntimeError('boom in rank 1') if sys.argv[1] == 'crash' else SystemExit(2)\n")
    for how, status in (("crash", 1), ("user", 2)):
        proc = subprocess.run(
            [sys.executable, "-m", "training.torchrun", "--nnodes", "1", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), how],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == status, proc.stderr
        assert "ChildFailedError" not in proc.stderr and "=====" not in proc.stderr, proc.stderr
        tandem_lines = [line for line in proc.stderr.splitlines() if line.startswith("tandem: error:")]
        if how == "crash":
            assert "RuntimeError: boom in rank 1" in proc.stderr
            assert tandem_lines == ["tandem: error: rank 1 exited with status 1; its output is above"], proc.stderr
        else:
            assert tandem_lines == [] and "Traceback" not in proc.stderr, proc.stderr


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_sigterm_to_an_nproc_launch_stops_its_ranks(tmp_path):
    """`--nproc N` runs torchrun as a child; a SIGTERM (a scheduler's, `timeout`'s, `kill PID`) sent to
    the tandem process alone must reach it, not leave the ranks running on as orphans."""
    out = tmp_path / "never-finishes"
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from training.launch import run_local; "
         f"sys.exit(run_local(2, ['data', 'synth', '--out', {str(out)!r}, '--train-samples', '5000000']))"],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len([p for p in _processes_mentioning(str(out)) if p != launcher.pid]) < 3:  # agent + 2 ranks
            assert time.monotonic() < deadline and launcher.poll() is None, "the ranks never started"
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 128 + signal.SIGTERM  # torchrun's agent stopped by it, as a shell reports
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_mentioning(str(out)) == []
    finally:
        for pid in _processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)


def test_sigusr1_prints_where_a_process_waits_and_lets_it_run():
    """`kill -USR1` on a hung rank (or torchrun's agent) shows its threads' stacks in its log."""
    waiter = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom training.cli import dump_stacks_on_sigusr1\n"
         "def waits_for_a_peer():\n    print('up', flush=True)\n    time.sleep(60)\n"
         "dump_stacks_on_sigusr1()\nwaits_for_a_peer()"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout.readline() == "up\n"
        waiter.send_signal(signal.SIGUSR1)
        time.sleep(1)
        assert waiter.poll() is None  # still running
    finally:
        waiter.kill()
    stderr = waiter.communicate(timeout=30)[1]
    assert "in waits_for_a_peer" in stderr and "most recent call first" in stderr, stderr
    # Asked of torchrun as the ranks' stop signal (SLURM's pre-emption notice), SIGUSR1 stays a stop.
    stopped = subprocess.run(
        [sys.executable, "-c", "import os, signal\nfrom training.cli import dump_stacks_on_sigusr1\n"
         "dump_stacks_on_sigusr1()\nos.kill(os.getpid(), signal.SIGUSR1)\nprint('ran on')"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR1"})
    assert stopped.returncode == -signal.SIGUSR1 and "ran on" not in stopped.stdout
    # With stderr closed (sys.stderr is None) a mistake is still one line and exit 2, not a silent exit 1.
    closed = subprocess.run(["bash", "-c", f"{sys.executable} -m training.cli eval --model /nonexistent "
                             "--data /nonexistent 2>&-"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert closed.returncode == 2 and closed.stdout.startswith("tandem: error: "), (closed.returncode, closed.stdout)


def test_half_a_rendezvous_environment_is_one_line(monkeypatch):
    from training import distributed

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="^WORLD_SIZE is set but RANK is not: a multi-process launch sets"):
        distributed.init()
    assert not distributed.is_initialized()


@pytest.mark.parametrize("value", ["ten", "0", "-5", "inf", ""])
def test_a_bad_collective_timeout_is_one_line_and_changes_nothing(monkeypatch, value):
    from training import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TANDEM_DIST_TIMEOUT_S", value)
    with pytest.raises(UserError, match=f"^TANDEM_DIST_TIMEOUT_S must be a number of seconds > 0, got '{value}'$"):
        distributed.init()
    assert not distributed.is_initialized() and "RANK" not in os.environ  # refused before forming anything


def test_key_tracing_is_off_unless_asked_for(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from training.trainer import Trainer

    trainer = SimpleNamespace(run_dir=tmp_path, step=0)
    for value, on in (("", False), ("0", False), ("false", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("TANDEM_TRACE_KEYS", value)
        trace = Trainer._key_trace(trainer)
        assert (trace is not None) == on, value
        if trace:
            trace.close()


def test_open_clip_towers_take_only_their_own_image_size(tmp_path, synth_data):
    """A timm tower pools any crop size; open_clip's ViT does not, so a method's other view sizes are
    refused before anything starts (they were a shape traceback at the first step)."""
    vit = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "vit.json").write_text(json.dumps(vit))
    common = [f'data.train_shards="{synth_data}/train/shard-{{00000..00003}}.tar"', f'model.name="{tmp_path / "vit.json"}"',
              f'train.run_dir="{tmp_path / "run"}"']
    check_inputs(load(None, [*common, 'method.name="simclr"']))
    check_inputs(load(None, [*common, 'method.name="swav"', "method.small_crops=0", "method.image_size=32"]))
    with pytest.raises(UserError, match="^swav's small crops need a timm image tower; .* set method.small_crops=0$"):
        check_inputs(load(None, [*common, 'method.name="swav"']))
    with pytest.raises(UserError, match="^method.image_size 24: model .* takes only 32 px images"):
        check_inputs(load(None, [*common, 'method.name="byol"', "method.image_size=24"]))
    check_inputs(load(None, [f'data.train_shards="{synth_data}/train/shard-{{00000..00003}}.tar"',
                             'method.name="swav"', "method.image_size=24"]))  # tandem-tiny's tower is timm's


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK must be a whole number >= 0, got 'abc'"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK must be a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK 2 is not below WORLD_SIZE 1"),
    ({"RANK": "0", "WORLD_SIZE": "1"}, "MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, "MASTER_PORT must be a port"),
])
def test_launch_variables_are_checked_before_any_rendezvous(env, needle):
    from training.distributed import check_launch_env

    with pytest.raises(UserError, match=needle):
        check_launch_env(env)
    check_launch_env({})  # a single process sets none
    check_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})


def test_torchrun_arguments_that_would_hang_or_trace_are_one_line():
    from training.torchrun import check_arguments

    tail = ["--nproc-per-node", "1", "-m", "training.cli", "train"]
    assert check_arguments(["--nnodes", "2", "--node-rank", "1", "--master-port", "29500", *tail]) is None
    assert "--master-port must be a port number in 1..65535, got 99999" in check_arguments(
        ["--master-port", "99999", *tail])
    assert "--node-rank 3 is not below --nnodes 1" in check_arguments(["--nnodes", "1", "--node-rank", "3", *tail])
    # a malformed RANK does not break the logging set-up of a command that never launches
    proc = subprocess.run([sys.executable, "-m", "training.cli", "data", "synth", "--out", "/dev/null/x"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RANK": "abc"}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "tandem: error: --out /dev/null/x cannot be written: /dev/null is not a writable folder"], proc.stderr[-2000:]


def test_a_path_the_system_refuses_is_one_line(tmp_path, capsys):
    from training.cli import main

    long = tmp_path / ("a" * 300)
    for args in (["export", "--run", str(long)], ["train", "--config", f"{long}.toml"], ["demo", "--out", str(long)]):
        assert main(args) == 2, args
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("tandem: error: File name too long: "), args
