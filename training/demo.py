"""``tandem demo``: synthetic shards -> DeepSpeed training on local processes -> eval -> export."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from training import config as config_mod
from training.errors import UserError

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.toml"
DEMO_NPROC = 2  # the demo configs are written for this many processes (the CPU default)
EVAL_KEYS = (
    "zero_shot_top1", "zero_shot_top5",
    "image_to_text_recall@1", "image_to_text_recall@5", "image_to_text_recall@10",
    "text_to_image_recall@1", "text_to_image_recall@5", "text_to_image_recall@10",
)


def data_dir_for(out: Path, framing: str) -> Path:
    """``OUT/data`` for the scene framing, ``OUT/data-<framing>`` otherwise, so the CLIP demo and the
    image-only demos can share one ``--out`` without regenerating each other's shards."""
    return out / ("data" if framing == "scene" else f"data-{framing}")


def ensure_dataset(data_dir: Path, train_samples: int, test_samples: int, framing: str = "scene") -> None:
    """Generate the synthetic shards unless a previous demo already did (same framing and sizes)."""
    classes = data_dir / "classes.json"
    if classes.is_file() and (data_dir / "test" / "sizes.json").is_file():
        try:
            framing_found = json.loads(classes.read_text()).get("framing", "scene")
        except (ValueError, AttributeError):
            framing_found = None
        found = (framing_found, _samples(data_dir / "train"), _samples(data_dir / "test"))
        if found == (framing, train_samples, test_samples):
            print(f"using the dataset in {data_dir}")
            return
        print(f"regenerating {data_dir}: it holds {found[1]} train + {found[2]} test samples of {found[0]} "
              f"framing, not {train_samples} + {test_samples} of {framing}")
    from data.synth import write_dataset

    start = time.time()
    try:
        write_dataset(data_dir, train_samples, test_samples, seed=0, framing=framing)
    except ValueError as error:
        raise UserError(str(error)) from None
    print(f"generated {train_samples} train + {test_samples} test samples ({framing} framing) in {data_dir} "
          f"({time.time() - start:.0f}s)")


def _samples(split: Path) -> int | None:
    """Samples in a split's shards (None when its sizes.json is unreadable)."""
    from data.shards import count_samples

    try:
        return count_samples([str(p) for p in sorted(split.glob("shard-*.tar"))])
    except UserError:
        return None


def _override_key(text: str) -> str:
    """``section.key`` of a ``--set section.key=value``."""
    return text.partition("=")[0].strip()


# Keys a demo fixes itself: it trains on its synthetic shards into OUT/run (OUT/run-<method>),
# evaluates that run's export, and runs the method it was asked for (`tandem demo --method`).
_SYNTHETIC = "the demo trains and evaluates on its synthetic shards"
DEMO_OWNED = {"train.run_dir": "use --out", "train.export": "the demo evaluates the export",
              "train.stop_at": "the demo evaluates a finished run", "method.name": "use --method",
              "data.train_shards": _SYNTHETIC, "data.val_shards": _SYNTHETIC, "data.classes": _SYNTHETIC}
MARKER = ".tandem-demo"  # in an --out folder a demo has written to


def claim_out(out: Path) -> None:
    """Make ``out`` a demo folder: new, empty, or one a demo wrote (which a demo rewrites: its run of
    the same method, its data, eval.json). A folder of anything else is refused, not overwritten."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not (out / "demo.toml").is_file():
        raise UserError(f"--out {out} holds files that no tandem demo wrote: choose a new or empty folder "
                        "(a demo replaces its run, data and eval.json there)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tandem demo; a later demo may replace what is here\n")


def run_name(method: str) -> str:
    """The run folder of a demo under ``--out``: each method its own, so one demo leaves another's be."""
    return "run" if method == "clip" else f"run-{method}"


def demo_config(config: Path, overrides: list[str], nproc: int) -> config_mod.Config:
    """``config`` with ``overrides``, its per-process batch scaled so that ``nproc`` processes train
    the global batch it was written for (``DEMO_NPROC`` processes), unless the overrides set the batch.

    One GPU then trains the two CPU processes' samples in one process: the demos' figures depend
    on the global batch (simclr at 64 instead of 128 gained +0.02 kNN instead of +0.41).
    """
    cfg = config_mod.load(config, overrides)
    if nproc == DEMO_NPROC or any(_override_key(o) == "data.batch_size" for o in overrides):
        return cfg
    global_batch = cfg.data.batch_size * DEMO_NPROC
    cfg = config_mod.from_dict({"data": {"batch_size": max(1, global_batch // nproc)}}, cfg)
    print(f"{nproc} process{'es' * (nproc > 1)}: batch {cfg.data.batch_size} per process "
          f"(the demo's global batch is {global_batch})")
    return cfg


def train_on_synthetic(out: Path, config: Path, *, nproc: int, train_samples: int, test_samples: int,
                       overrides: list[str], framing: str, method: str = "clip"):
    """Generate (or reuse) the synthetic shards of ``framing`` under ``data_dir_for(OUT, framing)``, then
    run ``tandem train`` with ``config`` (plus ``overrides``) on ``nproc`` local processes into
    ``OUT/run_name(method)``, its config written beside it as ``OUT/<that name>.toml`` (``demo.toml``
    for CLIP).

    Returns (resolved config, run dir, exit status, training seconds).
    """
    from training.launch import run_local
    from training.checks import check_inputs

    for key in map(_override_key, overrides):
        if key in DEMO_OWNED:
            raise UserError(f"tandem demo sets {key} itself ({DEMO_OWNED[key]}); `tandem train --config` "
                            "runs any config")
    # A mistyped --set is reported before the data are generated (the shards' names come after).
    config_mod.load(config, ['data.train_shards="synthetic"', *overrides]).validate()
    claim_out(out)
    data_dir, run_dir = data_dir_for(out, framing), out / run_name(method)
    ensure_dataset(data_dir, train_samples, test_samples, framing)
    values = {
        "data.train_shards": f"{data_dir}/train/shard-{{00000..{_last_shard(data_dir / 'train')}}}.tar",
        "data.val_shards": f"{data_dir}/test/shard-{{00000..{_last_shard(data_dir / 'test')}}}.tar",
        "data.classes": str(data_dir / "classes.json"),
        "train.run_dir": str(run_dir),
    }
    paths = [f"{key}={config_mod.toml_string(value)}" for key, value in values.items()]  # a quote in --out too
    cfg = demo_config(config, paths + list(overrides), nproc)
    check_inputs(cfg)
    config_file = out / ("demo.toml" if method == "clip" else f"{run_dir.name}.toml")
    config_file.write_text(config_mod.to_toml(cfg))
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    # On failure the ranks (a user error) or training.torchrun (a crash) have printed the one line.
    status = run_local(nproc, ["train", "--config", str(config_file)])
    return cfg, run_dir, status, time.time() - start


def run_demo(out: Path, *, nproc: int, train_samples: int, test_samples: int, overrides: list[str],
             framing: str) -> int:
    from training.evaluate import evaluate_export

    out = Path(out).resolve()
    cfg, run_dir, status, trained = train_on_synthetic(
        out, DEMO_CONFIG, nproc=nproc, train_samples=train_samples, test_samples=test_samples, overrides=overrides,
        framing=framing)
    if status != 0:
        return status
    result = evaluate_export(str(run_dir / "export"), cfg.data.val_shards, cfg.data.classes)
    (out / "eval.json").write_text(json.dumps({k: result[k] for k in EVAL_KEYS} | {"num_samples": result["num_samples"]}, indent=2))
    _report(out, Path(cfg.data.classes).parent, run_dir, result, trained)
    return 0


def _last_shard(folder: Path) -> str:
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise UserError(f"no shards in {folder}")
    return shards[-1].stem.split("-")[-1]


def _report(out: Path, data_dir: Path, run_dir: Path, result: dict, seconds: float) -> None:
    print(f"\ntrained in {seconds:.0f}s on {result['num_samples']} held-out samples:")
    for key in EVAL_KEYS:
        print(f"  {key:26s} {result[key]:.3f}")
    print(f"\n  data         {data_dir}")
    print(f"  run          {run_dir}  (config.toml, metrics.jsonl, eval.jsonl, checkpoints/)")
    print(f"  export       {run_dir / 'export'}  (open_clip local-dir:)")
    print(f"  eval.json    {out / 'eval.json'}")
