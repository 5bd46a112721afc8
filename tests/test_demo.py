"""`tandem demo` end to end, on a smaller budget than the README's full run."""

import json

import pytest

from tests.conftest import tandem
from training.demo import EVAL_KEYS, ensure_dataset

pytestmark = pytest.mark.slow


def test_demo_generates_trains_evaluates_and_exports(tmp_path, capsys):
    out = tmp_path / "demo"
    proc = tandem("demo", "--out", str(out), "--train-samples", "512", "--test-samples", "128",
                  "--set", "train.steps=4", "--set", "data.batch_size=32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "eval.json").read_text())
    assert set(EVAL_KEYS) <= set(result) and result["num_samples"] == 128
    assert all(0.0 <= result[k] <= 1.0 for k in EVAL_KEYS)
    assert (out / "run" / "export" / "open_clip_config.json").is_file()
    assert "eval.json" in proc.stdout and "zero_shot_top1" in proc.stdout
    # a second demo reuses the dataset instead of regenerating it
    shards = sorted((out / "data").rglob("*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    ensure_dataset(out / "data", 512, 128)
    assert "using the dataset" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in shards] == stamps


def test_each_framing_has_its_own_dataset_and_a_mismatch_is_regenerated(tmp_path, capsys):
    from training.demo import data_dir_for

    scene, objects = data_dir_for(tmp_path, "scene"), data_dir_for(tmp_path, "object")
    assert scene != objects
    ensure_dataset(scene, 24, 12, "scene")
    ensure_dataset(objects, 24, 12, "object")
    assert json.loads((objects / "classes.json").read_text())["framing"] == "object"
    assert json.loads((scene / "classes.json").read_text())["framing"] == "scene"
    ensure_dataset(objects, 24, 12, "object")
    assert "using the dataset" in capsys.readouterr().out
    # A folder written with the other framing (here: scene shards asked for as object) is rewritten.
    ensure_dataset(scene, 24, 12, "object")
    assert "regenerating" in capsys.readouterr().out
    assert json.loads((scene / "classes.json").read_text())["framing"] == "object"


def test_demo_keeps_its_global_batch_whatever_the_processes(capsys):
    """The demo configs are written for 2 processes; one GPU (1 process) trains the same global batch."""
    from training.demo import DEMO_CONFIG, DEMO_NPROC, demo_config
    from training.unimodal.demo import method_config

    for config in (DEMO_CONFIG, method_config("simclr")):
        written = demo_config(config, [], DEMO_NPROC).data.batch_size
        assert demo_config(config, [], 1).data.batch_size == 2 * written
        assert demo_config(config, [], 4).data.batch_size == written // 2
        assert demo_config(config, ["data.batch_size=24"], 1).data.batch_size == 24  # the user's batch stands
    assert "1 process: batch 256 per process (the demo's global batch is 256)" in capsys.readouterr().out


def test_method_demo_reports_the_trained_and_both_untrained_baselines(tmp_path):
    out = tmp_path / "simclr"
    proc = tandem("demo", "--method", "simclr", "--out", str(out), "--train-samples", "256", "--test-samples", "64",
                  "--set", "train.steps=2", "--set", "method.eval_train_samples=128", "--set", "method.linear_steps=10")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "eval.json").read_text())
    scores = [f"{kind}_top1{of}" for kind in ("knn", "linear") for of in ("", "_random_init", "_random_init_precise_bn")]
    assert all(0.0 <= result[k] <= 1.0 for k in scores)
    assert (result["method"], result["steps"], result["num_samples"], result["num_train_samples"]) == ("simclr", 2, 64, 128)
    assert "random init, precise BN" in proc.stdout and "eval.json" in proc.stdout


def test_demo_leaves_a_folder_of_other_files_alone_and_checks_its_settings_first(tmp_path):
    """An --out holding files no demo wrote is refused whole; a mistyped --set or a key the demo sets
    itself is one line before any data are generated."""
    from training.demo import MARKER, claim_out

    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "notes.txt").write_text("precious")
    proc = tandem("demo", "--out", str(mine), "--set", "train.steps=1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"tandem: error: --out {mine} holds files that no tandem demo wrote: choose a new or empty folder "
        "(a demo replaces its run, data and eval.json there)"]
    assert (mine / "run" / "notes.txt").read_text() == "precious" and not (mine / MARKER).exists()
    claim_out(tmp_path / "new")  # new, then a demo folder: claimed again
    claim_out(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).is_file()

    for flag, needle in (("train.stepz=3", "unknown config key 'train.stepz'"),
                         ('data.classes="/x.json"', "tandem demo sets data.classes itself")):
        proc = tandem("demo", "--out", str(tmp_path / "typo"), "--set", flag)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not any((tmp_path / "typo").glob("data*"))
