"""Training-step throughput: Tandem's DeepSpeed step against open_clip's own training step, same run.

    uv run python bench/step.py [--model ViT-B-32] [--batch 256] [--steps 20] [--warmup 5] [--rounds 2]

Both sides train the same open_clip model config (built from scratch: no weights are downloaded)
on the same batch of random images and token ids, kept on the device, so the loader is out of the
picture (``bench/data.py`` measures that), with the same AdamW settings and gradient clipping:

- tandem: ``training.trainer.Trainer`` as ``tandem train`` builds it, timed through its
  ``train_step``: the DeepSpeed engine (on GPU: bf16 weights and activations with fp32 master
  weights under ZeRO-1; on CPU: fp32), the ``gather`` InfoNCE loss, the temperature clamp.
- open_clip: what ``open_clip_train``'s ``train_one_epoch`` does per step with ``--precision
  amp_bf16`` on GPU (fp32 module, ``torch.autocast`` bf16, ``open_clip.loss.ClipLoss``, AdamW,
  ``clip_grad_norm_``) or ``fp32`` on CPU.

Each side runs ``--warmup`` untimed steps, then ``--steps`` steps with the device synchronised
after each; rounds alternate the two sides (one model alive at a time) and each side reports its
best round's median step. Peak memory is the device's allocator high-water mark (GPU only).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import config as config_mod, distributed  # noqa: E402
from training.model import create_model  # noqa: E402
from training.model_config import resolve_model_config  # noqa: E402
from training.optim import param_groups  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batch(model_cfg: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = model_cfg["vision_cfg"]["image_size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    context = model_cfg["text_cfg"].get("context_length", 77)
    vocab = model_cfg["text_cfg"].get("vocab_size", 49408)
    images = torch.randn(batch, 3, *size, generator=gen)
    texts = torch.randint(1, vocab, (batch, context), generator=gen)
    return images.to(device), texts.to(device)


def _time(step, warmup: int, steps: int) -> tuple[list[float], float]:
    """Per-step seconds of ``steps`` steps after ``warmup``, and the last loss."""
    for _ in range(warmup):
        loss = step()
    _sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        _sync()
        times.append(time.perf_counter() - start)
    return times, float(loss)


def _profile(step, path: Path) -> None:
    """Five more steps under torch.profiler; the op table (by self device time, then by CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        _sync()
    table = prof.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.write_text("\n".join(table.table(sort_by=key, row_limit=40) for key in (sort, "cpu_time_total")))


def _reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def run_tandem(args, images, texts, run_dir: str) -> dict:
    from training.trainer import Trainer

    cfg = config_mod.load(None, [
        f'model.name="{args.model}"', f"data.batch_size={args.batch}", f'train.run_dir="{run_dir}"',
        f"train.steps={args.warmup + args.steps + 10}", "optim.warmup_steps=1", f"optim.lr={args.lr}",
        f'train.precision="{args.precision}"',
    ])
    trainer = Trainer(cfg)
    trainer.build()
    dtype = torch.bfloat16 if trainer.bf16 else torch.float32
    batch = [{"image": images.to(dtype), "text": texts}]
    times, loss = _time(lambda: trainer.train_step(batch), args.warmup, args.steps)
    if args.profile:
        _profile(lambda: trainer.train_step(batch), Path(args.profile) / "profile-tandem.txt")
    result = {"times": times, "loss": loss, "peak_gib": _peak_gib(), "bf16": trainer.bf16,
              "precision": "bf16 (DeepSpeed, ZeRO-1, fp32 master)" if trainer.bf16 else "fp32 (DeepSpeed)"}
    del trainer, batch
    return result


def run_open_clip(args, images, texts, model_cfg: dict, amp: bool) -> dict:
    """open_clip_train's step; ``amp``: its ``amp_bf16`` precision (when Tandem's run is bf16), else fp32."""
    from open_clip.loss import ClipLoss

    device = images.device
    model = create_model(model_cfg).to(device)
    defaults = config_mod.Config()
    optimizer = torch.optim.AdamW(param_groups(model, defaults.optim.weight_decay, 100.0), lr=args.lr,
                                  betas=(defaults.optim.beta1, defaults.optim.beta2), eps=defaults.optim.eps)
    loss_fn = ClipLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.optim.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip_train does
        return loss.detach()

    times, loss = _time(step, args.warmup, args.steps)
    if args.profile:
        _profile(step, Path(args.profile) / "profile-open_clip.txt")
    result = {"times": times, "loss": loss, "peak_gib": _peak_gib(),
              "precision": "amp_bf16 (torch.autocast)" if amp else "fp32",
              "params": sum(p.numel() for p in model.parameters())}
    del model, optimizer
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip or Tandem model name")
    parser.add_argument("--batch", type=int, default=256, help="samples per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="Tandem's train.precision; open_clip gets amp_bf16 when Tandem runs bf16")
    parser.add_argument("--profile", metavar="DIR", help="also write each side's torch.profiler op table here")
    args = parser.parse_args(argv)

    distributed.init()
    device = distributed.device()
    model_cfg = resolve_model_config(config_mod.ModelConfig(name=args.model))
    images, texts = _batch(model_cfg, args.batch, device)
    rounds: dict[str, list[dict]] = {"tandem": [], "open_clip": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in ("tandem", "open_clip"):
                _reset_memory()
                torch.manual_seed(0)
                if name == "tandem":  # first in each round: the peer takes its precision from it
                    result = run_tandem(args, images, texts, os.path.join(tmp, f"run{round_}"))
                else:
                    result = run_open_clip(args, images, texts, model_cfg, amp=rounds["tandem"][-1]["bf16"])
                result["median_s"] = statistics.median(result.pop("times"))
                rounds[name].append(result)
                print(f"round {round_ + 1}: {name:9s} {result['median_s'] * 1e3:8.1f} ms/step "
                      f"({args.batch / result['median_s']:7.1f} samples/s, {result['precision']}, "
                      f"peak {result['peak_gib']} GiB, loss {result['loss']:.3f})", flush=True)
    best = {name: min(rs, key=lambda r: r["median_s"]) for name, rs in rounds.items()}
    tandem, peer = best["tandem"], best["open_clip"]
    out = {
        "model": args.model, "params_m": round(peer["params"] / 1e6, 1), "batch": args.batch,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "samples_per_s": round(args.batch / tandem["median_s"], 1),
        "open_clip_samples_per_s": round(args.batch / peer["median_s"], 1),
        "ratio_vs_open_clip": round(peer["median_s"] / tandem["median_s"], 2),
        "step_ms": round(tandem["median_s"] * 1e3, 1), "open_clip_step_ms": round(peer["median_s"] * 1e3, 1),
        "peak_gib": tandem["peak_gib"], "open_clip_peak_gib": peer["peak_gib"],
        "precision": tandem["precision"], "open_clip_precision": peer["precision"],
        "loss_finite": all(math.isfinite(r["loss"]) for r in rounds["tandem"] + rounds["open_clip"]),
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    distributed.shutdown()
    return out


if __name__ == "__main__":
    main()
