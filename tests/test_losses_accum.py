"""Contrastive gradient accumulation (GradCache): k micro-batches give the gradients of one k-times
batch, in process on a bare module and on 2 ranks under DeepSpeed ZeRO 0-3."""

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_script
from tests.scripts.temperature_zero import TINY
from training.config import LossConfig, ModelConfig
from training.grad_cache import grad_cache_step
from training.model import create_model
from training.model_config import resolve_model_config
from training.trainer import contrastive_loss

SCRIPT = Path(__file__).parent / "scripts" / "loss_accum.py"
K, MICRO = 4, 4


class PlainEngine:
    """What ``grad_cache_step`` asks of a DeepSpeed engine, on a bare module (gradients stay in .grad)."""

    def __init__(self, module):
        self.module, self.steps = module, 0

    def __call__(self, images, texts):
        return self.module(images, texts)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.steps += 1


def batch(model_cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, text = model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]
    return (torch.randn(n, 3, size, size, generator=g),
            torch.randint(1, text["vocab_size"], (n, text["context_length"]), generator=g))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert (got[name] - want[name]).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("impl", ["gather", "tiled", "siglip"])
def test_accumulated_step_equals_k_times_batch(impl):
    model_cfg = {**TINY, "init_logit_bias": -10.0} if impl == "siglip" else TINY
    torch.manual_seed(0)
    model = create_model(model_cfg)
    loss_fn = lambda out: contrastive_loss(LossConfig(impl=impl, tile_size=5), out)  # noqa: E731
    images, texts = batch(model_cfg, K * MICRO)

    whole = copy.deepcopy(model)
    big_loss = loss_fn(whole(images, texts))
    big_loss.backward()

    engine = PlainEngine(model)
    micro = list(zip(images.split(MICRO), texts.split(MICRO)))
    loss = grad_cache_step(engine, micro, loss_fn)
    assert engine.steps == K and torch.allclose(loss, big_loss, rtol=1e-5)
    assert_same_grads(grads(model), grads(whole))
    assert "logit_scale" in grads(model) and ("logit_bias" in grads(model)) == (impl == "siglip")


def test_second_forward_replays_the_randomness():
    """With patch dropout, each micro-batch's second forward must drop the same patches."""
    model_cfg = copy.deepcopy(TINY)
    model_cfg["vision_cfg"]["patch_dropout"] = 0.5
    torch.manual_seed(0)
    model = create_model(model_cfg)
    reference = copy.deepcopy(model)
    loss_fn = lambda out: contrastive_loss(LossConfig(impl="tiled"), out)  # noqa: E731
    micro = list(zip(*(t.split(MICRO) for t in batch(model_cfg, K * MICRO))))

    torch.manual_seed(1)  # reference: the micro-batches forwarded once each, with autograd
    outs = [reference(*m) for m in micro]
    loss_fn({k: torch.cat([o[k] for o in outs]) if o0.dim() == 2 else o0
             for k, o0 in outs[0].items()}).backward()
    after = torch.get_rng_state()

    torch.manual_seed(1)
    grad_cache_step(PlainEngine(model), micro, loss_fn)
    assert_same_grads(grads(model), grads(reference))
    assert torch.equal(torch.get_rng_state(), after)  # the stream goes on as if each forward ran once


def test_batchnorm_statistics_update_once_per_micro_batch():
    """The real tiny model (BatchNorm in its image tower): gradients are those of the micro-batches'
    forwards, and the running statistics move once per micro-batch, not twice."""
    model_cfg = resolve_model_config(ModelConfig())
    torch.manual_seed(0)
    model = create_model(model_cfg)
    reference = copy.deepcopy(model)
    loss_fn = lambda out: contrastive_loss(LossConfig(impl="tiled"), out)  # noqa: E731
    micro = list(zip(*(t.split(MICRO) for t in batch(model_cfg, K * MICRO))))

    outs = [reference(*m) for m in micro]
    loss_fn({k: torch.cat([o[k] for o in outs]) if o0.dim() == 2 else o0
             for k, o0 in outs[0].items()}).backward()
    grad_cache_step(PlainEngine(model), micro, loss_fn)
    assert_same_grads(grads(model), grads(reference))
    stats = {n: b for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    assert stats
    for name, buffer in reference.named_buffers():
        if name in stats:
            assert torch.allclose(stats[name].float(), buffer.float(), atol=1e-6), name


@pytest.mark.slow
def test_deepspeed_accumulation_equals_k_times_batch_under_zero_0_to_3(tmp_path):
    out = tmp_path / "accum.json"
    proc = run_script(SCRIPT, 2, str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *runs, plain = json.loads(out.read_text())
    assert [(r["stage"], r["impl"]) for r in runs] == [(0, "tiled"), (1, "tiled"), (2, "tiled"), (3, "tiled"),
                                                       (2, "siglip")]
    for r in runs:
        assert r["update"] > 0, r  # the step moved the weights
        assert r["diff"] <= 1e-4 * r["update"], r
    # DeepSpeed's plain accumulation (each micro-batch its own negatives) is measurably different
    assert plain["plain"] and plain["diff"] > 1e-2 * plain["update"], plain


@pytest.mark.slow
def test_train_siglip_accumulated_resumes_exactly_and_exports_logit_bias(tmp_path, synth_data):
    """`tandem train` (one process, DeepSpeed ZeRO-1) with SigLIP and accum_steps=2 over 3 loader
    workers: a run stopped after step 1 and resumed ends with the weights of an uninterrupted one
    (the loader's role offset counts micro-batches, not steps: with steps the resumed step 2 would
    read other samples), and the export carries the learned logit_bias in open_clip's shape."""
    import open_clip

    from tests.conftest import tandem
    from training.distributed import consolidated_state_dict

    def train(run_dir, *extra):
        sets = [f'data.train_shards="{synth_data}/train/shard-{{00000..00003}}.tar"', "data.batch_size=8",
                "data.workers=3", "data.shuffle_buffer=16", 'loss.impl="siglip"', "loss.tile_size=6",
                "train.accum_steps=2", "train.steps=3", f'train.run_dir="{run_dir}"', "train.zero_stage=1",
                "optim.warmup_steps=1"]
        proc = tandem("train", *(a for s in sets for a in ("--set", s)), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]

    full, split = tmp_path / "full", tmp_path / "split"
    train(full)
    train(split, "--set", "train.stop_at=1", "--set", "train.export=false")
    train(split, "--resume", "latest")
    want = consolidated_state_dict(full / "checkpoints", "step00000003")
    got = consolidated_state_dict(split / "checkpoints", "step00000003")
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{full / 'export'}")
    bias, scale = model.logit_bias.detach(), model.logit_scale.detach()
    assert bias.shape == torch.Size([]) and bias.item() == pytest.approx(float(want["logit_bias"].detach().reshape(())))
    assert bias.item() != -10.0 and scale.exp().item() != pytest.approx(10.0)  # from SigLIP's init, trained
