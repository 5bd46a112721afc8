"""``tandem``: demo, train, eval, export and data commands.

Each command parses, builds and runs; a user's mistake (``UserError``) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from data.framings import FRAMINGS
from serving.settings import PRECISIONS
from training.config import METHOD_NAMES
from training.errors import CollectiveError, UserError

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.toml"


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` (to ``high``), else argparse's one-line error."""
    rule = f">= {low}" if high is None else f"{low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Distributed CLIP training and evaluation.")
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="synthetic data -> 2-process DeepSpeed training -> eval -> export")
    demo.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    demo.add_argument("--nproc", type=_int_in(1),
                      help="local training processes (default: 2; on a GPU node one per GPU, at most 2)")
    demo.add_argument("--train-samples", type=_int_in(1), default=20000)
    demo.add_argument("--test-samples", type=_int_in(1), default=2000)
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override the demo config (training/configs/demo.toml, or <method>.toml)")
    demo.add_argument("--method", default="clip",
                      choices=METHOD_NAMES,
                      help="clip (default) or an image-only baseline, evaluated by kNN and linear probe")
    demo.add_argument("--framing", choices=tuple(FRAMINGS),
                      help="synthetic images: small shapes in scenes (clip's default) or object-centric "
                           "large shapes (the image-only methods' default)")

    train = sub.add_parser("train", help="train a CLIP model from a TOML config")
    train.add_argument("--config", help="TOML file with the deltas from the defaults")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--resume", help="'latest' or a checkpoint tag in the run directory")
    train.add_argument("--nproc", type=_int_in(1), default=1, help="start N local processes (torchrun)")

    ev = sub.add_parser("eval", help="zero-shot classification and retrieval of an exported model")
    ev.add_argument("--model", required=True, help="export directory (open_clip local-dir format)")
    ev.add_argument("--data", required=True, help="test shards: a directory or a brace pattern")
    ev.add_argument("--classes", default="",
                    help="classes.json with classes and templates, for zero-shot (each sample's label is the "
                         "'class' field of its .json); without it, retrieval only")
    ev.add_argument("--batch-size", type=_int_in(1), default=256)
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    ex = sub.add_parser("export", help="consolidated fp32 open_clip export of a checkpoint")
    ex.add_argument("--run", required=True, help="run directory of a training run")
    ex.add_argument("--tag", help="checkpoint tag (default: latest)")
    ex.add_argument("--out", help="export directory (default: RUN/export)")

    serve = sub.add_parser("serve", help="HTTP server: zero-shot classification, embeddings, image-text search")
    serve.add_argument("--model", required=True,
                       help="export directory, or an open_clip model name / config .json with --weights")
    serve.add_argument("--weights", help=".safetensors weights for a model name or config (pickle is refused)")
    serve.add_argument("--index", help="index directory written by `tandem index` (for /v1/search)")
    serve.add_argument("--wait-for-model", action="store_true",
                       help="start before the export at --model is written and load it once it is (/readyz: 503 "
                            "waiting); for a Deployment applied with its training job")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_int_in(0, 65535), default=8000)
    serve.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    serve.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="bf16: forward passes under bf16 autocast (needs AVX512-BF16/AMX or an Ampere+ GPU)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="images per forward pass (1: no batching)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for a batch")
    serve.add_argument("--workers", type=int, default=4, help="threads decoding images and searching the index")
    serve.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: one per core)")
    serve.add_argument("--max-pixels", type=int, default=50_000_000, help="larger images are refused (413)")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies are refused (413)")
    serve.add_argument("--label-cache", type=int, default=64, help="label sets whose embeddings are cached")
    serve.add_argument("--nprobe", type=int, default=16, help="IVF index: lists visited per query")
    serve.add_argument("--ef-search", type=int, default=64, help="HNSW index: search breadth")
    serve.add_argument("--access-log", action="store_true")

    index = sub.add_parser("index", help="embed every image of WebDataset shards into a FAISS index")
    index.add_argument("--model", required=True, help="export directory (or a model name with --weights)")
    index.add_argument("--weights", help=".safetensors weights for a model name or config")
    index.add_argument("--data", required=True, help="shards: a directory or a brace pattern")
    index.add_argument("--out", required=True, help="index directory (resumes an unfinished one)")
    index.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                       help="flat: exact; ivf or hnsw: approximate, for millions of items")
    index.add_argument("--nlist", type=_int_in(0), default=0, help="IVF lists (0: about 4*sqrt(N))")
    index.add_argument("--hnsw-m", type=_int_in(2), default=32, help="HNSW neighbours per node")
    index.add_argument("--batch-size", type=_int_in(1), default=256)
    index.add_argument("--chunk-size", type=_int_in(1), default=8192, help="embeddings per resumable chunk")
    index.add_argument("--device", default="auto")
    index.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="of the forward passes, as tandem serve's (a resumed build keeps its own)")
    index.add_argument("--overwrite", action="store_true",
                       help="rebuild a finished index, or start an unfinished one over")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the procedural image-caption shards")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train-samples", type=_int_in(1), default=20000)
    synth.add_argument("--test-samples", type=_int_in(1), default=2000)
    synth.add_argument("--seed", type=_int_in(0), default=0)
    synth.add_argument("--image-size", type=_int_in(16), default=64)
    synth.add_argument("--framing", choices=tuple(FRAMINGS), default="scene",
                       help="small shapes in scenes (default) or large object-centric shapes")
    shards = data_sub.add_parser("shards", help="write img2dataset-layout shards from images + captions")
    shards.add_argument("--input", required=True,
                        help="folder of images with caption sidecars (a.jpg + a.txt), or a .csv/.tsv/.parquet table")
    shards.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (reruns resume)")
    shards.add_argument("--samples-per-shard", type=_int_in(1), default=10000)
    shards.add_argument("--max-size", type=_int_in(0), default=0, help="downscale longer sides above this (0: keep)")
    shards.add_argument("--quality", type=_int_in(1, 100), default=95, help="JPEG quality of re-encoded images")
    shards.add_argument("--csv-img-key", default="filepath")
    shards.add_argument("--csv-caption-key", default="caption")
    shards.add_argument("--csv-separator", help="default: tab for .tsv, comma for .csv")
    shards.add_argument("--workers", type=_int_in(1), default=1, help="processes encoding shards in parallel")
    shards.add_argument("--s3-endpoint-url", default="", help="S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")
    return parser


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to the process's stderr and lets it run
    on: where a hung rank waits (a collective, the data loader, a store) without py-spy or a debugger.
    Forked data-loader workers inherit it."""
    if not hasattr(signal, "SIGUSR1"):
        return
    if "SIGUSR1" in os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", ""):
        return  # torchrun was asked to stop its ranks with it (SLURM's pre-emption notice)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, RuntimeError, io.UnsupportedOperation):
        pass  # no stderr, or one without a file descriptor (a caller capturing it): nowhere to print


def _setup_logging() -> None:
    text = os.environ.get("RANK", "0").strip()
    rank = int(text) if text.isdigit() else 0  # a malformed RANK is reported by distributed.init, in one line
    prefix = "[tandem] " if rank == 0 else f"[tandem rank {rank}] "
    logging.basicConfig(level=logging.WARNING, format=prefix + "%(message)s")
    for ours in ("training", "data", "serving"):
        logging.getLogger(ours).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def shard_pattern(path: str) -> str:
    """A directory of ``*.tar`` becomes a list of its shards; anything else is taken as a pattern."""
    folder = Path(path)
    if folder.is_dir():
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        if not shards:
            raise UserError(f"no .tar shards in {folder}")
        return "::".join(shards)
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from training import config as config_mod
    from training.checks import check_inputs, check_run_start
    from training.launch import launched, run_local

    cfg = config_mod.load(args.config, args.set)
    check_inputs(cfg, args.resume)  # before the heavy imports, so a mistake is reported at once
    check_run_start(Path(cfg.train.run_dir), args.resume)
    if args.nproc > 1 and not launched():
        forwarded = ["train"] + (["--config", args.config] if args.config else [])
        forwarded += [part for item in args.set for part in ("--set", item)]
        forwarded += ["--resume", args.resume] if args.resume else []
        return run_local(args.nproc, forwarded)
    from training import distributed
    from training.trainer import train

    result = train(cfg, resume=args.resume)
    if result and distributed.is_main():
        print(json.dumps(result))
    distributed.shutdown()  # a process group left to the interpreter's exit can abort in its destructor
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from data.classes import load_classes
    from data.shards import expand_shards
    from training.model_config import check_export_dir

    # Before the heavy imports, so a mistake is reported in about a second.
    check_export_dir(args.model)
    shards = shard_pattern(args.data)
    expand_shards(shards)
    if args.classes:
        load_classes(args.classes)
    from training.evaluate import evaluate_export

    result = evaluate_export(args.model, shards, args.classes, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.checks import check_run_dir, check_writable_dir

    check_run_dir(args.run, args.tag)  # before the heavy imports
    if args.out:
        check_writable_dir(args.out, "--out")
    from training.export import export_checkpoint

    out = export_checkpoint(Path(args.run), Path(args.out or Path(args.run) / "export"), args.tag)
    print(f"exported to {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "shards":
        return cmd_data_shards(args)
    from data.synth import write_dataset
    from training.checks import check_writable_dir

    check_writable_dir(args.out, "--out")
    start = time.time()
    try:
        summary = write_dataset(args.out, args.train_samples, args.test_samples, seed=args.seed,
                                image_size=args.image_size, framing=args.framing)
    except ValueError as error:
        raise UserError(str(error)) from None
    print(f"wrote {summary['train']['samples']} train and {summary['test']['samples']} test samples, "
          f"{summary['classes']} classes, to {args.out} in {time.time() - start:.1f}s")
    return 0


def cmd_data_shards(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from data.s3 import S3Settings
    from data.writer import Output, WriteOptions, input_rows, write_shards

    rows = input_rows(args.input, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    options = WriteOptions(samples_per_shard=args.samples_per_shard, max_size=args.max_size, quality=args.quality)
    settings = S3Settings(endpoint_url=args.s3_endpoint_url)
    Output(args.out, settings).check()  # a bad target fails in one line, before the progress bar
    with tqdm(total=len(rows), unit="img", desc="shards") as bar:
        totals = write_shards(rows, args.out, options, settings=settings, workers=args.workers, progress=bar.update)
    print(f"wrote {totals['successes']} of {totals['count']} samples in {totals['shards']} shards to {args.out} "
          f"({totals['resumed']} shards already complete); skipped: {json.dumps(totals['failures'])}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # serving.* never imports deepspeed or webdataset: the serve image does not install them
    from serving.app import serve
    from serving.settings import ServeSettings, body_bytes

    settings = ServeSettings(model=args.model, weights=args.weights, index=args.index,
                             wait_for_model=args.wait_for_model, device=args.device, precision=args.precision,
                             max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             workers=args.workers, threads=args.threads, max_pixels=args.max_pixels,
                             max_body_bytes=body_bytes(args.max_body_mb), label_cache=args.label_cache,
                             nprobe=args.nprobe, ef_search=args.ef_search)
    serve(settings, host=args.host, port=args.port, access_log=args.access_log)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from training.checks import check_writable_dir

    check_writable_dir(args.out, "--out")
    from training.indexing import build_index

    summary = build_index(args.model, shard_pattern(args.data), Path(args.out), weights=args.weights,
                          kind=args.kind, nlist=args.nlist, hnsw_m=args.hnsw_m, batch_size=args.batch_size,
                          chunk_size=args.chunk_size, device=args.device, precision=args.precision,
                          overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from training.checks import check_writable_dir
    from training.demo import DEMO_NPROC, run_demo
    from training.launch import default_nproc, gpu_count

    check_writable_dir(args.out, "--out")

    args.nproc = args.nproc or default_nproc(gpu_count(), DEMO_NPROC)
    framing = args.framing or ("scene" if args.method == "clip" else "object")
    if args.method != "clip":
        from training.unimodal.demo import run_method_demo

        return run_method_demo(Path(args.out), args.method, nproc=args.nproc, train_samples=args.train_samples,
                               test_samples=args.test_samples, overrides=args.set, framing=framing)
    return run_demo(Path(args.out), nproc=args.nproc, train_samples=args.train_samples,
                    test_samples=args.test_samples, overrides=args.set, framing=framing)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "data": cmd_data, "demo": cmd_demo,
            "serve": cmd_serve, "index": cmd_index}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    dump_stacks_on_sigusr1()
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        if not (isinstance(error, CollectiveError) and os.environ.get("LOCAL_RANK", "0") != "0"):
            print(f"tandem: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in _PATH_ERRNOS or not error.filename:
            raise  # not about a named path: a fault to see whole, traceback and all
        # A path that the system refuses (too long, read-only, not a folder ...): the checks cannot
        # foresee every one, and the system's own words, with the path, say it.
        print(f"tandem: error: {error.strerror}: {error.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130


_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                errno.ENOSPC, errno.ELOOP}


if __name__ == "__main__":
    sys.exit(main())
