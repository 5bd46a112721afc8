"""Run under torchrun: for ZeRO stages 0-3, push logit_scale up with a huge learning rate and
report the optimizer's own copy and the module's copy of it after every step."""

import json
import math
import sys

import torch
import torch.nn.functional as F

from training import distributed
from training.config import OptimConfig
from training.losses import clip_loss
from training.model import create_model, init_logit_scale
from training.optim import build_optimizer, cosine_schedule

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def optimizer_copies(engine) -> list[float]:
    """Values of every tensor in the temperature's param group of the optimizer that updates it."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    values = []
    for group in inner.param_groups:
        if "max_value" in group:
            for p in group["params"]:
                values.extend(p.detach().float().flatten().tolist())
    return values


def module_value(engine) -> float:
    param = engine.module.logit_scale
    if hasattr(param, "ds_id"):  # ZeRO-3 partitions it: gather to read
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return float(param.detach().float().reshape(-1)[0])
    return float(param.detach().float().reshape(-1)[0])


def run(stage: int, max_scale: float) -> dict:
    torch.manual_seed(0)
    model = create_model(TINY)
    init_logit_scale(model, 0.07)
    distributed.lift_scalar_parameters(model)
    cfg = OptimConfig(lr=5.0, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    optimizer = build_optimizer(model, cfg, max_scale)
    engine = distributed.build_engine(model, optimizer, cosine_schedule(optimizer, cfg, 100), micro_batch=4,
                                      zero_stage=stage, bf16=False, grad_clip=0.0)
    g = torch.Generator().manual_seed(distributed.rank())
    images, texts = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 64, (4, 8), generator=g)
    trace = []
    for _ in range(4):
        out = engine(images, texts)
        # identical image and text features: a larger scale always lowers the loss
        feats = F.normalize(out["image_features"], dim=-1)
        loss = clip_loss(feats, feats.detach(), out["logit_scale"])
        engine.backward(loss)
        engine.step()
        copies = [v for part in distributed.all_gather_object(optimizer_copies(engine)) for v in part]
        trace.append({"optimizer": max(copies or [-math.inf]), "module": module_value(engine)})
    return {"stage": stage, "max_scale": max_scale, "trace": trace}


if __name__ == "__main__":
    distributed.init()
    results = [run(stage, 100.0) for stage in (0, 1, 2, 3)] + [run(1, 1e6)]
    if distributed.is_main():
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    distributed.barrier()
    distributed.shutdown()
