"""Methods and their parts: every registered method trains a step, MoCo's queue, momentum targets,
the collapse monitor, multi-view transforms and the kNN / linear-probe evaluation."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.conftest import free_port

from training.config import METHOD_NAMES, MethodConfig, OptimConfig
from training.distributed import batch_norms_with_fp32_statistics
from training.optim import build_optimizer
from training.unimodal import methods as methods_mod, parts
from training.unimodal.evaluate import collapse_stats, is_collapsed, knn_top1, linear_probe_top1
from training.unimodal.losses import sinkhorn
from training.unimodal.methods import METHODS, build_method
from training.unimodal.parts import KeyQueue, cosine_momentum, split_views
from training.unimodal.transforms import MultiView, recipes

SIZE = 16


def tiny_backbone() -> tuple[nn.Module, int]:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 16)), 16


def make(name: str, **knobs):
    torch.manual_seed(0)
    cfg = MethodConfig(name=name, proj_hidden=32, proj_dim=8, queue_size=10, prototypes=5, **knobs)
    return build_method(name, *tiny_backbone(), cfg)


def views(name: str, batch: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, r.size, r.size) for r in recipes(name, SIZE)]
    return [torch.randn(batch, *shape, generator=g) for shape in shapes]


def test_registry_matches_config_names():
    assert set(METHOD_NAMES) == {"clip"} | set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_step(name):
    method = make(name)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for p in method.backbone.parameters()]
    out = method(views(name), torch.arange(6) % 3)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]) and out["embedding"].shape == (6, 8)
    out["loss"].backward()
    optimizer.step()
    method.after_step(1, 10)
    assert any(not torch.equal(b, p) for b, p in zip(before, method.backbone.parameters()))


def test_queue_is_fifo_and_wraps_around():
    queue = KeyQueue(5, 2)
    first = torch.arange(6.0).reshape(3, 2)
    queue.enqueue(first)
    assert torch.equal(queue.keys[:3], first) and int(queue.ptr) == 3
    second = 10 + torch.arange(6.0).reshape(3, 2)
    queue.enqueue(second)  # two rows at the end, the third wraps to the front, over the oldest
    assert torch.equal(queue.keys[3:], second[:2]) and torch.equal(queue.keys[0], second[2])
    assert torch.equal(queue.keys[1:3], first[1:]) and int(queue.ptr) == 1
    queue.enqueue(torch.ones(7, 2) * torch.arange(7.0)[:, None])  # more than fits: the newest 5 stay
    assert sorted(queue.keys[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_moco_negatives_never_contain_the_current_keys(monkeypatch):
    method = make("moco")
    seen, original = [], methods_mod.moco_loss

    def spy(q, k, queue, temperature):
        seen.append((k.detach().clone(), queue.clone()))
        return original(q, k, queue, temperature)

    monkeypatch.setattr(methods_mod, "moco_loss", spy)
    for step in range(3):  # 12 keys per step into a queue of 10: the queue wraps every step
        method(views("moco", seed=step))
        (k_b, negatives), (k_a, _) = seen[-2], seen[-1]
        current = torch.cat([k_a, k_b])
        distances = torch.cdist(current, negatives)
        assert distances.min() > 1e-4, step  # no key of this batch is among its negatives
        # ...and they are enqueued afterwards for the next batch (12 keys into 10 slots: all but the
        # two oldest stay)
        assert torch.cdist(current[2:], method.queue.keys).min(1).values.max() < 1e-6


@pytest.mark.parametrize("name", ["moco", "moco_v3", "byol"])
def test_targets_take_no_gradient_and_follow_the_ema_exactly(name):
    method = make(name, momentum=0.9, momentum_end=0.99)
    targets = ([method.target_backbone, method.target_projector] if name == "byol"
               else [method.key_backbone, method.key_projector])
    online = [method.backbone, method.projector]
    optimizer = build_optimizer(method, OptimConfig(lr=0.05), 100.0)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for t in targets for p in t.parameters())  # out of the optimizer
    for step in (1, 2, 3):
        old = [p.detach().clone() for t in targets for p in t.parameters()]
        method(views(name, seed=step))["loss"].backward()
        assert all(p.grad is None and not p.requires_grad for t in targets for p in t.parameters())
        optimizer.step()
        optimizer.zero_grad()
        method.after_step(step, 4)
        m = 0.9 if name == "moco" else cosine_momentum(step, 4, 0.9, 0.99)  # v2 constant; v3, BYOL cosine
        assert method.momentum == pytest.approx(m)
        new_online = [p.detach() for o in online for p in o.parameters()]
        for before, now, src in zip(old, (p for t in targets for p in t.parameters()), new_online):
            assert torch.allclose(now, m * before + (1 - m) * src, atol=1e-7)
    assert cosine_momentum(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(10, 10, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(5, 10, 0.99, 1.0) == pytest.approx(0.995)


@pytest.mark.parametrize("name, paper", [("moco", 0.999), ("moco_v3", 0.99), ("byol", 0.996)])
def test_momentum_defaults_to_the_papers_value(name, paper):
    method = make(name)  # method.momentum left at -1
    method.after_step(1, 1000)
    expected = paper if name == "moco" else cosine_momentum(1, 1000, paper, 1.0)
    assert method.momentum == pytest.approx(expected)
    assert make(name, momentum=0.0, momentum_end=0.0).base_momentum == 0.0  # 0 is a momentum, not "default"



def test_bf16_targets_follow_the_fp32_ema():
    """Under bf16 every parameter is bf16, the frozen target's too; the average must still move it.
    In bf16 itself ``t += 0.004 * (o - t)`` rounds away whenever the step is under half a unit in the
    last place, and the target stays where it started."""
    torch.manual_seed(0)
    online = nn.Linear(64, 64)
    target = parts.frozen_copy(online).bfloat16()
    reference = [p.detach().float() for p in target.parameters()]  # fp32 EMA from the same start
    naive = [p.detach().clone() for p in target.parameters()]  # the same EMA done in bf16
    for _ in range(60):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.01 * torch.randn_like(p))
        parts.ema_update_(target, online, 0.996)
        for r, b, o in zip(reference, naive, online.parameters()):
            r.mul_(0.996).add_(o.detach(), alpha=0.004)
            b.mul_(0.996).add_(o.detach().bfloat16(), alpha=0.004)
    for t, r, b in zip(target.parameters(), reference, naive):
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, r.bfloat16())  # the fp32 average, rounded once
        assert (b.float() - r.bfloat16().float()).abs().max() > 10 * (t.float() - r).abs().max()  # the naive one drifts


def test_bf16_batch_norms_keep_fp32_statistics():
    """DeepSpeed's bf16 casts parameters, not buffers: BatchNorm then holds bf16 weights and fp32
    statistics, which CUDA's kernels refuse. Patched layers normalise with the affine upcast, keep
    fp32 statistics and match an fp32 layer to bf16 rounding, in training and in eval."""
    torch.manual_seed(0)
    for layer, shape in ((nn.BatchNorm2d(4), (8, 4, 5, 5)), (nn.BatchNorm1d(4, momentum=None), (8, 4))):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        low = nn.Sequential(copy.deepcopy(layer), nn.BatchNorm1d(4, affine=False) if len(shape) == 2 else nn.Identity())
        reference = nn.Sequential(layer, copy.deepcopy(low[1]))
        for p in low.parameters():
            p.data = p.data.bfloat16()
        assert batch_norms_with_fp32_statistics(low) == 1  # the affine-free layer needs no patch
        for mode in ("train", "train", "train", "eval"):
            low.train(mode == "train")
            reference.train(mode == "train")
            x = torch.randn(shape)
            out = low(x.bfloat16())
            assert out.dtype == torch.bfloat16
            assert torch.allclose(out.float(), reference(x), atol=0.05), mode
        assert low[0].running_var.dtype == torch.float32
        assert torch.allclose(low[0].running_var, layer.running_var, rtol=0.02)
        assert int(low[0].num_batches_tracked) == 3
        assert copy.deepcopy(low)[0].forward.__self__ is not low[0]  # a copy (a momentum target) keeps its own

def _train(method, steps: int) -> dict:
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 3, SIZE, SIZE, generator=g)
    for step in range(1, steps + 1):
        pair = [base + 0.3 * torch.randn(base.shape, generator=g) for _ in range(2)]
        out = method(pair)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, steps)
    with torch.no_grad():
        method.eval()
        return collapse_stats(method.projector(method.backbone(base)))


def test_collapse_monitor_flags_byol_without_predictor_and_momentum():
    threshold = MethodConfig().collapse_threshold
    collapsing = _train(make("byol", predictor=False, momentum=0.0, momentum_end=0.0), 40)
    healthy = _train(make("simclr", temperature=0.2), 40)
    assert is_collapsed(collapsing, threshold), collapsing
    assert not is_collapsed(healthy, threshold), healthy
    assert healthy["effective_rank"] > 2 * collapsing["effective_rank"]


def test_collapse_stats_extremes():
    spread = collapse_stats(torch.randn(512, 16))
    assert 0.9 < spread["embedding_std"] < 1.1 and spread["effective_rank"] > 12
    point = collapse_stats(torch.ones(512, 16) + 1e-6 * torch.randn(512, 16))
    assert point["embedding_std"] < 1e-3 and point["effective_rank"] < 1.1


@pytest.mark.parametrize("name", ["simclr", "byol", "swav"])
def test_multiview_transform_round_trips(name):
    transform = MultiView(recipes(name, 24))
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    flat = torch.stack([transform(image), transform(image)])
    parts = split_views(flat, transform.shapes)
    assert [tuple(p.shape[1:]) for p in parts] == transform.shapes
    assert len(parts) == (4 if name == "swav" else 2) and parts[-1].shape[-1] == (12 if name == "swav" else 24)
    with pytest.raises(ValueError):
        split_views(flat[:, :-1], transform.shapes)


def test_only_methods_with_a_softmax_have_a_temperature():
    """The metrics log a temperature only where the loss has one (the paper's unless set)."""
    papers = {"simclr": 0.5, "supcon": 0.1, "moco": 0.2, "moco_v3": 1.0, "swav": 0.1, "byol": None, "simsiam": None,
              "barlow_twins": None}
    assert {name: make(name).temperature for name in papers} == papers
    assert make("moco", temperature=0.07).temperature == 0.07 and make("byol", temperature=0.07).temperature is None


def test_each_method_crops_as_its_paper_does_unless_told():
    """crop_min_scale 0 is the paper's: 0.08 for SimCLR and BYOL's pair, 0.2 in the MoCo v2, SimSiam and
    SupCon code; any other value is every view's."""
    papers = {"simclr": 0.08, "byol": 0.08, "barlow_twins": 0.08, "moco_v3": 0.08, "moco": 0.2, "simsiam": 0.2,
              "supcon": 0.2, "swav": 0.14}
    for name, scale in papers.items():
        assert recipes(name, 24)[0].min_scale == scale, name
        assert recipes(name, 24, 0.3)[1].min_scale == 0.3, name


def test_knn_and_linear_probe():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 5
    labels, test_labels = torch.arange(400) % 4, torch.arange(100) % 4
    train = centres[labels] + torch.randn(400, 8, generator=g)
    test = centres[test_labels] + torch.randn(100, 8, generator=g)
    assert knn_top1(train, labels, test, test_labels) > 0.95
    assert linear_probe_top1(train, labels, test, test_labels, steps=100) > 0.95
    shuffled = labels[torch.randperm(400, generator=g)]  # labels carry no information
    assert knn_top1(train, shuffled, test, test_labels) < 0.5
    # A small temperature: the single nearest neighbour (class 1, cosine 0.99) outvotes five of class 0
    # at cosine 0.9; exp(sim / t) itself would overflow to inf for both and hand the vote to class 0.
    angle = torch.tensor([0.99, 0.9, 0.9, 0.9, 0.9, 0.9]).acos()
    points = torch.stack([angle.cos(), angle.sin()], 1)
    for t in (0.1, 0.01, 0.005):
        assert knn_top1(points, torch.tensor([1, 0, 0, 0, 0, 0]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]),
                        k=6, temperature=t) == (1.0 if t < 0.1 else 0.0), t


def test_collapse_stats_of_one_row_is_not_a_collapse():
    one = collapse_stats(torch.randn(1, 16))
    assert one["embedding_std"] != one["embedding_std"]  # NaN: no spread to measure
    assert not is_collapsed(one, MethodConfig().collapse_threshold)


def test_swav_scores_use_unit_prototypes_without_rewriting_them():
    """Under ZeRO the optimizer writes its fp32 masters back over the module's weights, so an
    in-place renormalisation of the prototypes would not last; the forward normalises in the graph."""
    method, batch = make("swav"), views("swav")
    loss = method(batch)["loss"]
    with torch.no_grad():
        method.prototypes.weight.mul_(torch.linspace(0.2, 5.0, 5)[:, None])  # drifted norms
    scaled = method.prototypes.weight.detach().clone()
    assert torch.allclose(method(batch)["loss"], loss, atol=1e-6)
    assert torch.equal(method.prototypes.weight, scaled)


def test_heads_follow_their_papers():
    bn = lambda module: any(isinstance(m, nn.BatchNorm1d) for m in module.modules())  # noqa: E731
    assert not bn(make("moco").projector)  # MoCo v2: Linear-ReLU-Linear
    assert bn(make("simclr").projector) and bn(make("byol").projector) and bn(make("byol").predictor)
    assert isinstance(make("moco_v3").projector[-1], nn.BatchNorm1d)  # v3's projector ends in BatchNorm


def test_swav_prototypes_take_no_gradient_while_frozen():
    method = make("swav", freeze_prototypes_steps=2)
    for step in (1, 2, 3):
        method.zero_grad()
        method(views("swav", seed=step))["loss"].backward()
        grad = method.prototypes.weight.grad
        assert (grad is None) == (step <= 2) and (grad is None or grad.abs().sum() > 0)
        assert method.backbone[0].weight.grad.abs().sum() > 0  # the rest trains meanwhile
        method.after_step(step, 10)
    assert int(method.state_dict()["steps_done"]) == 3  # checkpoints carry where the freeze stands


def swav_batches(count: int, rows: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """``count`` batches of two global crops' unit embeddings ``[rows, 8]`` (make's proj_dim)."""
    g = torch.Generator().manual_seed(seed)
    return [[F.normalize(torch.randn(rows, 8, generator=g), dim=-1) for _ in range(2)] for _ in range(count)]


def swav_codes(method, z, rows=slice(None)):
    prototypes = F.normalize(method.prototypes.weight.detach(), dim=-1)
    z = [crop[rows] for crop in z]
    return method.codes([crop @ prototypes.T for crop in z], tuple(z), prototypes)


def test_swav_queue_joins_sinkhorn_once_full_and_fills_from_its_start_step():
    method = make("swav", swav_queue=12, swav_queue_start_steps=1)
    prototypes = F.normalize(method.prototypes.weight.detach(), dim=-1)
    plain = lambda z: [sinkhorn(crop @ prototypes.T) for crop in z]  # noqa: E731
    first, *filling, full, after = swav_batches(5, 6)
    assert all(torch.equal(c, p) for c, p in zip(swav_codes(method, first), plain(first)))
    assert int(method.queued) == 0  # nothing queued before the start step
    method.after_step(1, 10)
    for z in filling:  # two batches of 6 fill the queue of 12; until then the codes are the batch's own
        assert all(torch.equal(c, p) for c, p in zip(swav_codes(method, z), plain(z)))
    assert int(method.queued) == 12
    for crop in range(2):  # FIFO, per global crop
        assert torch.equal(method.queues[crop].keys, torch.cat([z[crop] for z in filling]))
    queued = [q.keys.clone() for q in method.queues]
    codes = swav_codes(method, full)
    for crop in range(2):
        expected = sinkhorn(torch.cat([queued[crop], full[crop]]) @ prototypes.T)[-6:]
        assert torch.allclose(codes[crop], expected, atol=1e-6)
        assert not torch.allclose(codes[crop], plain(full)[crop], atol=1e-3)
        assert torch.allclose(codes[crop].sum(1), torch.ones(6), atol=1e-5)
        assert torch.equal(method.queues[crop].keys[:6], full[crop])  # the oldest rows go first
    swav_codes(method, after)
    assert all(torch.equal(method.queues[crop].keys, torch.cat([full[crop], after[crop]])) for crop in range(2))
    assert {"queues.0.keys", "queues.1.ptr", "queued"} <= set(method.state_dict())  # checkpoints carry it
    assert not {k for k in make("swav").state_dict() if k.startswith("queue")}  # none without a queue


def test_swav_forward_trains_with_the_queue():
    method = make("swav", swav_queue=12)
    for seed in range(4):  # the queue is full from the third batch on
        out = method(views("swav", seed=seed))
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
    assert int(method.queued) == 24 and method.backbone[0].weight.grad.abs().sum() > 0


def _swav_queue_worker(rank, world, port, batches, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method, rows = make("swav", swav_queue=16), len(batches[0][0]) // world
        out[rank] = [swav_codes(method, z, slice(rank * rows, (rank + 1) * rows)) for z in batches] + \
            [[q.keys.clone() for q in method.queues]]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_swav_queue_across_ranks_equals_one_process():
    """At world 2 the queue holds the global batch on every rank and each rank scores its half of
    it, so the codes equal one process's over the same global batches."""
    world, batches = 2, swav_batches(4, 8, seed=1)  # 2 batches of 8 fill the queue of 16
    out = mp.Manager().dict()
    mp.spawn(_swav_queue_worker, args=(world, free_port(), batches, out), nprocs=world, join=True)
    single = make("swav", swav_queue=16)
    for i, z in enumerate(batches):
        expected = swav_codes(single, z)
        for crop in range(2):
            got = torch.cat([out[r][i][crop] for r in range(world)])
            assert torch.allclose(got, expected[crop], atol=1e-5), (i, crop)
    for r in range(world):
        assert all(torch.equal(a, b.keys) for a, b in zip(out[r][-1], single.queues))


def test_supcon_samples_without_a_label_are_their_own_class(caplog):
    from types import SimpleNamespace

    from training.errors import UserError
    from training.unimodal.trainer import UnimodalTrainer

    trainer = SimpleNamespace(cfg=SimpleNamespace(method=MethodConfig(name="supcon", label_key="shape")),
                              step=0, device=torch.device("cpu"), unlabelled_warned=False)
    metas = [{"shape": "circle"}, {}, {"shape": "circle"}, {}]
    labels = UnimodalTrainer._labels(trainer, metas)
    assert labels[0] == labels[2] >= 0 and len({int(labels[1]), int(labels[3])} - set(labels[[0, 2]].tolist())) == 2
    assert trainer.unlabelled_warned and "2 of 4 samples at step 1 have no 'shape'" in caplog.text
    with pytest.raises(UserError, match=r"^supcon needs labels, and no sample of step 1's batch has 'shape'"):
        UnimodalTrainer._labels(trainer, [{}, {"class": "red circle"}])


def test_evaluation_without_a_labelled_sample_is_one_line(synth_data):
    from training.errors import UserError
    from training.unimodal.evaluate import evaluate_backbone
    from training.unimodal.transforms import eval_transform

    backbone, _ = tiny_backbone()
    with pytest.raises(UserError, match="^no samples with the label 'nope' in their .json to evaluate on$"):
        evaluate_backbone(backbone, train_shards=f"{synth_data}/test/shard-00000.tar",
                          test_shards=f"{synth_data}/test/shard-00001.tar", transform=eval_transform(SIZE),
                          label_key="nope", train_samples=32)


def test_precise_batchnorm_stats_are_the_data_averages_and_leave_the_backbone_alone(synth_data):
    from training.unimodal.evaluate import embed_images, recompute_batchnorm_stats
    from training.unimodal.transforms import eval_transform

    backbone, _ = tiny_backbone()
    norm = backbone[1]
    original = copy.deepcopy(backbone.state_dict())
    shards, transform = f"{synth_data}/train/shard-{{00000..00003}}.tar", eval_transform(SIZE)
    images = embed_images(nn.Flatten(), shards, transform, label_key="shape", max_samples=48)[0].view(48, 3, SIZE, SIZE)
    with torch.no_grad():
        conv = backbone[0](images).transpose(0, 1).flatten(1)  # [channels, pixels of all 48 images]
    # three equal batches of 16: the average of the batch means is the mean over all 48 images
    recalibrated = recompute_batchnorm_stats(backbone, shards, transform, samples=48, batch_size=16)
    assert torch.allclose(recalibrated[1].running_mean, conv.mean(1), atol=1e-5)
    assert int(recalibrated[1].num_batches_tracked) == 3 and not recalibrated.training
    # one batch: the running variance is that batch's (unbiased) variance
    one = recompute_batchnorm_stats(backbone, shards, transform, samples=48)
    assert torch.allclose(one[1].running_var, conv.var(1), rtol=1e-4)
    assert one[1].momentum == norm.momentum == 0.1
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in original.items())  # weights and stats untouched
    assert torch.equal(one[0].weight, backbone[0].weight)
