"""Run under torchrun: one optimizer step of k=4 accumulated micro-batches of 4 (GradCache) against
one step on a 16-row micro-batch, under ZeRO stages 0-3, with SGD(lr=1) so the weight change is the
rank-averaged gradient. Writes each run's largest update difference and largest update; the last
run is DeepSpeed's plain accumulation of 4 separate losses, which must differ."""

import contextlib
import json
import sys

import torch

from tests.scripts.temperature_zero import TINY
from training import distributed
from training.config import LossConfig
from training.grad_cache import grad_cache_step
from training.model import create_model, init_logit_scale
from training.trainer import contrastive_loss

K, MICRO = 4, 4


def flat_weights(engine, stage: int) -> torch.Tensor:
    params = list(engine.module.parameters())
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    else:
        gather = contextlib.nullcontext()
    with gather:
        return torch.cat([p.detach().float().reshape(-1).clone() for p in params])


def one_step(stage: int, impl: str, accum: int, plain: bool = False) -> torch.Tensor:
    """The weight change of one step; ``plain``: DeepSpeed's own accumulation of k separate losses."""
    model_cfg = {**TINY, "init_logit_bias": -10.0} if impl == "siglip" else TINY
    torch.manual_seed(0)
    model = create_model(model_cfg)
    init_logit_scale(model, 0.07)
    distributed.lift_scalar_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = distributed.build_engine(model, optimizer, None, micro_batch=K * MICRO // accum, zero_stage=stage,
                                      bf16=False, grad_clip=0.0, accum_steps=accum)
    before = flat_weights(engine, stage)
    g = torch.Generator().manual_seed(100 + distributed.rank())
    images = torch.randn(K * MICRO, 3, 16, 16, generator=g)
    texts = torch.randint(1, 64, (K * MICRO, 8), generator=g)
    micro = list(zip(images.split(K * MICRO // accum), texts.split(K * MICRO // accum)))
    loss_fn = lambda out: contrastive_loss(LossConfig(impl=impl, tile_size=6), out)  # noqa: E731
    if plain:
        for m in micro:
            engine.backward(loss_fn(engine(*m)))
            engine.step()
    else:
        grad_cache_step(engine, micro, loss_fn)
    assert engine.global_steps == 1, engine.global_steps
    return flat_weights(engine, stage) - before


if __name__ == "__main__":
    distributed.init()
    # the k-times batch without accumulation, once per loss (ZeRO stages do not change the update)
    whole = {impl: one_step(0, impl, 1) for impl in ("tiled", "siglip")}
    cases = [(stage, "tiled", False) for stage in (0, 1, 2, 3)] + [(2, "siglip", False), (1, "tiled", True)]
    runs = []
    for stage, impl, plain in cases:
        accumulated = one_step(stage, impl, K, plain)
        runs.append({"stage": stage, "impl": impl, "plain": plain, "update": float(whole[impl].abs().max()),
                     "diff": float((accumulated - whole[impl]).abs().max())})
    if distributed.is_main():
        with open(sys.argv[1], "w") as f:
            json.dump(runs, f)
    distributed.barrier()
    distributed.shutdown()
