"""Process group, DeepSpeed engine and collectives.

This is the only module that imports deepspeed. Everything else asks ``rank()`` and
``world_size()``, which answer 0 and 1 when no process group exists, so model, loss and data code
never branch on "am I distributed?".

The launch contract is the standard one: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``, as set by ``torchrun``, the ``deepspeed`` launcher, the Kubeflow operator, or
by hand. With none of them set, ``init()`` forms a one-process group on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import logging
import os
import shutil
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.files import atomic_write
from training.checks import checkpoint_folders
from training.errors import CollectiveError, UserError
from training.launch import free_port, launched

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's GPU (the one of its ``LOCAL_RANK``), or the CPU where there is none."""
    if torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank()} has no GPU: {torch.cuda.device_count()} visible on "
                            "this node, so start at most that many processes per node")
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def check_launch_env(env) -> None:
    """The variables a launcher sets, read before any rendezvous: a mistake there otherwise surfaces
    as torch's traceback (a port out of range), an import of mpi4py (no MASTER_ADDR), or a wait until
    the timeout (a rank outside the world)."""
    partial = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if len(partial) == 1:
        other = "WORLD_SIZE" if partial == ["RANK"] else "RANK"
        raise UserError(f"{partial[0]} is set but {other} is not: a multi-process launch sets RANK, WORLD_SIZE, "
                        "MASTER_ADDR and MASTER_PORT for every process (torchrun does), a single process none of them")
    numbers = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if key in env:
            text = env[key].strip()
            if not text.isdigit():
                raise UserError(f"{key} must be a whole number >= 0, got {env[key]!r}")
            numbers[key] = int(text)
    if not partial:
        return
    if not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise UserError(f"RANK {numbers['RANK']} is not below WORLD_SIZE {numbers['WORLD_SIZE']}: ranks are "
                        "numbered 0 .. WORLD_SIZE - 1")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key, "").strip()]
    if missing:
        raise UserError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        "not: every process of a launch needs the address and port of rank 0")
    if not 1 <= numbers["MASTER_PORT"] <= 65535:
        raise UserError(f"MASTER_PORT must be a port number in 1..65535, got {numbers['MASTER_PORT']}")


def init(timeout_s: float | None = None) -> None:
    """Join (or form) the process group: NCCL on GPU, gloo on CPU."""
    if is_initialized():
        return
    check_launch_env(os.environ)
    if not timeout_s:
        text = os.environ.get("TANDEM_DIST_TIMEOUT_S", "600")
        try:
            timeout_s = float(text)
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s < float("inf"):
            raise UserError(f"TANDEM_DIST_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    if not launched():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    _quiet_deepspeed()
    import deepspeed

    if not torch.cuda.is_available():
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce that only its inference path
        # uses; training's collectives go through gloo. Skipping it saves minutes on a first run
        # and the need for a C++ toolchain in the container (the op builder may return None).
        # ``import deepspeed.comm.torch as m`` would bind the torch package itself (deepspeed.comm
        # re-exports it as an attribute), so the module is looked up by name.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: int) -> int:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def norm_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics of every BatchNorm-style layer in ``module``."""
    stats = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._NormBase) and layer.track_running_stats:
            stats += [t for t in (layer.running_mean, layer.running_var) if t is not None]
    return stats


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in one collective.

    Applied to BatchNorm running statistics after every step: each rank would otherwise track
    statistics of its own batches, so ranks, checkpoints (written from rank 0) and a resumed run
    would hold different models. Averaging keeps them one model, as timm's ``distribute_bn`` does.
    """
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _collective_device() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward returns this rank's rows of the summed gradient.

    Each rank's loss depends on every rank's rows (they are its negatives), so the gradient of a
    row is the sum over all ranks' losses: an all-reduce of the full gradient, then this rank's
    slice. Plain all-reduce works on gloo, where reduce-scatter does not.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each rank -> ``[world * B, ...]`` in rank order, differentiable."""
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each rank -> ``[world * B, ...]`` in rank order, outside autograd.

    For losses whose backward routes the gradient of the gathered rows itself (see
    ``all_reduce_``); every rank must pass the same shape.
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_(x: torch.Tensor, *, max_: bool = False) -> torch.Tensor:
    """Sum (or with ``max_``, take the maximum of) ``x`` over ranks in place (outside autograd); returns it."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if max_ else dist.ReduceOp.SUM)
    return x


def lift_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Give 0-dim parameters shape ``[1]``; returns their names.

    DeepSpeed (0.19.8) views every parameter as bytes to broadcast it when the engine starts, which
    fails on 0-dim tensors such as open_clip's ``logit_scale``. A one-element vector broadcasts the
    same in every formula; the export puts the open_clip shape back.
    """
    lifted = []
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(param.detach().reshape(1)))
            lifted.append(name)
    return lifted


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    micro_batch: int,
    zero_stage: int,
    bf16: bool,
    grad_clip: float,
    accum_steps: int = 1,
):
    """Wrap model and optimizer in a DeepSpeed engine; gradients are averaged over ranks.

    With ``accum_steps`` > 1 the engine steps the optimizer on every ``accum_steps``-th
    ``engine.step()`` (``training.grad_cache`` drives it).
    """
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # No per-parameter inf/NaN scan before each bf16 step (DeepSpeed 0.19 turned it on for bf16 to
        # match fp16): bf16 has fp32's range, so nothing overflows that a loss scale would have to
        # catch, and the scan (amax, amin and isfinite per parameter) left a ViT-B/32 step on an H100
        # waiting on the host: 0.54x the speed of open_clip's own step with it, 0.72x without
        # (bench/step.py; the GPU time of the two steps is the same).
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        # Tandem's optimizer is torch AdamW plus a clamp; DeepSpeed calls it untested.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if bf16:
        batch_norms_with_fp32_statistics(engine.module)
    return engine


def batch_norms_with_fp32_statistics(module: torch.nn.Module) -> int:
    """Let BatchNorm layers with bf16 weights keep fp32 running statistics; returns how many.

    DeepSpeed's bf16 (0.19) casts parameters and leaves buffers alone, so a BatchNorm layer ends up
    with a bf16 weight and bias beside fp32 running statistics. The CPU kernel takes that mix; CUDA's
    refuses it ("Expected running_mean to have type BFloat16 but got Float"). Each such layer now
    normalises with its weight and bias upcast to fp32, the mix CUDA's kernels take (bf16 input,
    fp32 affine and statistics: the layout of mixed-precision BatchNorm everywhere), so the running
    statistics keep accumulating in fp32. Parameters, buffers and state-dict keys are unchanged.
    """
    count = 0
    for layer in module.modules():
        if (isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.affine
                and type(layer).forward is torch.nn.modules.batchnorm._BatchNorm.forward  # not e.g. timm's BatchNormAct2d
                and layer.weight.dtype != torch.float32
                and (layer.running_mean is None or layer.running_mean.dtype == torch.float32)):
            layer.forward = types.MethodType(_batch_norm_fp32_affine, layer)
            count += 1
    return count


def _batch_norm_fp32_affine(layer: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` (momentum, cumulative average, eval with or without running statistics),
    with the affine parameters in fp32."""
    layer._check_input_dim(x)
    factor = 0.0 if layer.momentum is None else layer.momentum
    if layer.training and layer.track_running_stats and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.add_(1)
        if layer.momentum is None:  # a cumulative moving average
            factor = 1.0 / float(layer.num_batches_tracked)
    batch_stats = layer.training or (layer.running_mean is None and layer.running_var is None)
    keep = not layer.training or layer.track_running_stats
    return torch.nn.functional.batch_norm(
        x, layer.running_mean if keep else None, layer.running_var if keep else None,
        layer.weight.float(), layer.bias.float(), batch_stats, factor, layer.eps,
    )


def save_checkpoint(engine, directory: Path, tag: str, client_state: dict) -> None:
    """Every rank writes its part of checkpoint ``tag`` into ``directory``; ``latest`` names it once
    all have.

    DeepSpeed's own save has rank 0 write ``latest`` as soon as its own files are written, not the
    other ranks', and writes into the tag's folder in place, so a run killed mid-save (a preempted
    pod) could leave ``latest`` naming a partial checkpoint, and every restart's ``--resume latest``
    would then fail on it. Here the ranks write into a hidden ``.saving-<tag>`` folder; after all
    have, rank 0 moves it into place and only then points ``latest`` at it (each step an atomic
    rename), so ``latest`` always names a complete checkpoint. A folder of the same tag (left by a
    run that a resume from an earlier checkpoint took over from) is replaced whole: written into,
    its surplus ZeRO partitions from another number of processes would spoil the new one.
    """
    directory = Path(directory)
    saving, folder, replaced = directory / f".saving-{tag}", directory / tag, directory / f".replaced-{tag}"
    engine.save_checkpoint(str(directory), tag=saving.name, client_state=client_state, save_latest=False)
    barrier()
    if rank() == 0:
        if folder.exists():
            folder.rename(replaced)
        saving.rename(folder)
        point_latest(directory, tag)
        shutil.rmtree(replaced, ignore_errors=True)
    barrier()


def point_latest(directory: Path, tag: str) -> None:
    """Rank 0: make ``directory/latest`` name ``tag``, atomically."""
    atomic_write(Path(directory) / "latest", tag.encode())  # on disk before the rename: never an empty pointer


def recover_checkpoints(directory: Path) -> None:
    """At a run's start, before it resumes or saves: rank 0 tidies what a run killed mid-save or
    mid-resize (or mid-prune) left in ``directory``, then all ranks go on together. A ``.replaced-<tag>`` whose
    ``<tag>`` is missing (killed between the two renames of a save, when ``latest`` may name it) goes
    back into place; every other leftover is removed."""
    directory = Path(directory)
    if rank() == 0 and directory.is_dir():
        for old in directory.glob(".replaced-*"):
            tag = directory / old.name.removeprefix(".replaced-")
            if tag.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(tag)
        for pattern in (".saving-*", ".resize-*", ".pruning-*"):
            for leftover in directory.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
    barrier()


def load_checkpoint(engine, directory: Path, tag: str | None) -> dict:
    """Restore ``tag`` (None: ``latest``) into the engine; returns the checkpoint's client state.

    A ZeRO checkpoint written by another number of processes is re-partitioned on the way in
    (``_load_repartitioned``, ``_load_universal``). A checkpoint this run cannot take (another ZeRO
    stage, another model) is a ``CollectiveError`` that says which setting differs: every rank finds
    the same, and DeepSpeed's own assertion or ``load_state_dict`` traceback would not say what to change.
    """
    directory = Path(directory)
    if tag is None and (directory / "latest").is_file():
        tag = (directory / "latest").read_text().strip()
    resize = tag is not None and check_checkpoint_layout(directory / tag, engine.zero_optimization_stage(),
                                                         world_size(), bf16=engine.bfloat16_enabled())
    try:
        if not resize:
            path, client_state = engine.load_checkpoint(str(directory), tag=tag)
        elif engine.zero_optimization_stage() < 3:
            path, client_state = _load_repartitioned(engine, directory, tag)
        else:
            path, client_state = _load_universal(engine, directory, tag)
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise _misfit(tag, " ".join(lines)[:300]) from None
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
    if resize and is_main():
        written = zero_partitions(directory / tag)
        log.info("resume: checkpoint %s was written by %d process%s and this run has %d: its ZeRO partitions of "
                 "the fp32 weights and optimizer state were re-partitioned", tag, written,
                 "es" * (written != 1), world_size())
    return client_state or {}


def _load_repartitioned(engine, directory: Path, tag: str) -> tuple[str | None, dict]:
    """ZeRO 1/2 at another world size. Each param group's fp32 weights and optimizer state are one
    flat vector in parameter order, cut into one equal part per process (padding at the end only):
    the checkpoint's parts, joined in rank order, are that vector, and this rank takes its new part
    of it. DeepSpeed loads the rest (module weights, buffers, EMA targets, schedule, client state);
    it refuses the optimizer's parts at another world size, and its universal-checkpoint loader
    fails on a group with fewer elements than processes (DeepSpeed 0.19: the temperature's group
    leaves a rank no element; ``IndexError`` in ``load_hp_checkpoint_state_from_checkpoint_dir``).
    """
    path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=False)
    optimizer = engine.optimizer
    mine = optimizer.single_partition_of_fp32_groups  # this rank's part of each group, padded
    offsets = [0] * len(mine)  # where the next saved part begins in its group's vector
    files = zero_part_files(directory / tag)
    for file in files:
        saved = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = saved["base_optimizer_state"]  # torch's state_dict of this part's optimizer
        for group, part in enumerate(mine):
            weights = saved["single_partition_of_fp32_groups"][group]  # saved without its padding
            start, offset = rank() * part.numel(), offsets[group]
            lo = max(offset, start)
            hi = max(lo, min(offset + weights.numel(), start + part.numel()))  # lo == hi: no overlap
            here, there = slice(lo - start, hi - start), slice(lo - offset, hi - offset)
            part.data[here] = weights[there]
            state = optimizer.optimizer.state[part]
            for key, value in base["state"].get(group, {}).items():
                if not torch.is_tensor(value) or value.dim() == 0:  # Adam's step: the same in every part
                    state[key] = value.clone() if torch.is_tensor(value) else value
                    continue
                if key not in state:
                    state[key] = torch.zeros_like(part)
                state[key][here] = value[there]
            offsets[group] += weights.numel()
        if file == files[0]:  # lr, betas, ...: the same in every part
            for group, saved_group in zip(optimizer.optimizer.param_groups, base["param_groups"]):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        del saved
    for group, (joined, params) in enumerate(zip(offsets, optimizer.bit16_groups)):
        expected = sum(param.numel() for param in params)
        if joined != expected:
            raise CollectiveError(f"checkpoint {tag} is incomplete: its {len(files)} ZeRO part(s) hold {joined} of "
                                  f"the {expected} values of parameter group {group}; {_earlier(directory / tag)}")
    return path, client_state


def convert_to_universal(folder: Path, out: Path) -> None:
    """Rewrite the ZeRO checkpoint ``folder`` (any world size) as DeepSpeed's universal checkpoint in
    ``out``: under ``out/zero``, one folder per parameter holding its whole fp32 weights and Adam moments."""
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    settings = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        to_universal(settings)  # prints its progress and tqdm bars


def _load_universal(engine, directory: Path, tag: str) -> tuple[str | None, dict]:
    """ZeRO 3 at another world size, through DeepSpeed's universal checkpoint: rank 0 rewrites the
    checkpoint with each parameter's fp32 weights and optimizer state whole, one folder per parameter,
    in a staging folder beside it (removed after the load), and every rank loads its new part."""
    staging = directory / f".resize-{tag}"
    converted, failed = staging / "converted", staging / "failed"
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # no marker of an earlier attempt may remain
    barrier()
    if rank() == 0:
        try:
            convert_to_universal(directory / tag, staging / tag)
            converted.touch()
        except Exception as error:  # noqa: BLE001 - every rank reports it below
            staging.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(error).__name__}: {error}"[:300])
    # The others wait on the file, not a collective: converting a large model may outlast the
    # collective timeout (TANDEM_DIST_TIMEOUT_S).
    while not (converted.exists() or failed.exists()):
        time.sleep(1.0)
    barrier()
    try:
        if failed.exists():
            raise CollectiveError(f"checkpoint {tag} could not be re-partitioned for {world_size()} processes: "
                                  f"{failed.read_text()}")
        saved_params = {p.name for p in (staging / tag / "zero").iterdir() if p.is_dir()}
        trained = {name for name, param in engine.module.named_parameters() if param.requires_grad}
        if saved_params != trained:
            missing, extra = sorted(trained - saved_params), sorted(saved_params - trained)
            raise _misfit(tag, f"missing {missing[:5]}, unexpected {extra[:5]}")
        engine._config.load_universal_checkpoint = True
        path, client_state = engine.load_checkpoint(str(staging), tag=tag)
        # The universal load restores what the optimizer holds; the buffers (BatchNorm statistics)
        # come from the module states, which hold the partitioned parameters as empty placeholders.
        saved = torch.load(directory / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
        engine.module.load_state_dict({k: v for k, v in saved.items() if k not in trained}, strict=False)
    finally:
        engine._config.load_universal_checkpoint = False
        barrier()
        if rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
    return path, client_state


def _misfit(tag: str, detail: str) -> CollectiveError:
    return CollectiveError(f"checkpoint {tag} does not fit this model (was it written with another model.*, "
                           f"loss.impl or method.*?): {detail}")


def _earlier(folder: Path) -> str:
    """What to resume from instead of the checkpoint in ``folder``."""
    earlier = [p.name for p in checkpoint_folders(folder.parent) if p.name < folder.name]
    return f"resume from an earlier one (--resume {earlier[-1]})" if earlier else "no earlier one is left"


def zero_part_files(folder: Path) -> list[Path]:
    """A checkpoint folder's ZeRO optimizer-state parts, one per process that wrote it, in rank order;
    none for stage 0. The files are ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``."""
    files = Path(folder).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")
    return sorted(files, key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))


def zero_partitions(folder: Path) -> int:
    """How many ZeRO optimizer-state partitions (one per process) a checkpoint folder holds; 0 for
    stage 0."""
    return len(zero_part_files(folder))


def check_checkpoint_layout(folder: Path, zero_stage: int, world: int, bf16: bool = False) -> bool:
    """The ZeRO stage and precision a checkpoint was written with must be this run's; returns whether
    its ZeRO partitions must be re-partitioned for this run's number of processes. DeepSpeed keeps the
    whole module in ``mp_rank_00_model_states.pt`` (stages 0-2) or one partition per process in
    ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (stage 3), and under ZeRO one partition of the
    optimizer state per process, named ``bf16_zero_pp_rank_...`` in a bf16 run: a run of the other
    precision looks for the other name and fails with a traceback (``train.precision = "auto"`` is
    bf16 on a GPU and fp32 on a CPU, so moving a run between them changes it)."""
    if not any(folder.glob("*model_states.pt")):
        state = "holds no model states" if folder.is_dir() else "does not exist"
        raise CollectiveError(f"checkpoint {folder.name} in {folder.parent} {state}; {_earlier(folder)}")
    for file in sorted(folder.glob("*.pt")):  # torch.save writes a zip: a cut-off one has no directory
        if not zipfile.is_zipfile(file):
            raise CollectiveError(f"checkpoint {folder.name} cannot be read: {file.name} is cut off or not a "
                                  f"checkpoint file; {_earlier(folder)}")
    partitions = zero_partitions(folder)
    if any(folder.glob("zero_pp_rank_*_model_states.pt")):
        written, stage_text = 3, "ZeRO stage 3"
    elif partitions:
        written, stage_text = 1, "ZeRO stage 1 or 2"
    else:
        written, stage_text = 0, "ZeRO stage 0"
    family = min(zero_stage, 1) if zero_stage < 3 else 3
    if written != family:
        raise CollectiveError(f"checkpoint {folder.name} was written with {stage_text} and this run uses stage "
                              f"{zero_stage}: resume with the train.zero_stage (and train.precision; bf16 runs "
                              "use stage >= 1) it was written with")
    parts = zero_part_files(folder)
    written_bf16 = bool(parts) and parts[0].name.startswith("bf16_")
    if parts and written_bf16 != bf16:
        names = {True: "bf16", False: "fp32"}
        raise CollectiveError(f"checkpoint {folder.name} was written in {names[written_bf16]} and this run trains in "
                              f"{names[bf16]}: resume with train.precision = \"{names[written_bf16]}\"")
    return bool(written) and partitions != world


def consolidated_state_dict(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint, whatever its ZeRO stage and precision.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer files, so DeepSpeed's own
    converter reassembles them; stage 0 stores the whole fp32 module in one file.
    """
    _quiet_deepspeed()
    ckpt = Path(directory) / tag
    if zero_partitions(ckpt):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    else:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{ckpt} holds no model states (mp_rank_*_model_states.pt)")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


class _ExpectedWarnings(logging.Filter):
    """Drops DeepSpeed's "untested optimizer, proceed with caution" on every ZeRO run (Tandem's
    optimizer is torch's AdamW plus a clamp, ``training.optim``, allowed on purpose in the config) and
    "MPU is not provided" on each universal-checkpoint load (Tandem has no tensor parallelism)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "untested optimizer" not in message and "MPU is not provided" not in message


def _quiet_deepspeed() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _ExpectedWarnings) for f in ds_logger.filters):
            ds_logger.addFilter(_ExpectedWarnings())
    except ImportError:  # deepspeed is optional for serving-only installs
        pass
