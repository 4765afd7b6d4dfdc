"""Weight averaging against torch's AveragedModel on the same trajectory, and the shared strategy contract."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from framework.averaging import AVERAGERS, WeightAverager, create_rule
from framework.recipe.schema import AveragingConfig


def _trajectory(model, steps: int, seed: int = 0):
    """Real SGD steps on random data: yields after each step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        yield


def _compare(rule, reference: AveragedModel, model, steps=12, every=1, start=1):
    ours = WeightAverager(rule, list(model.parameters()), start_step=start, every_steps=every, offload=False)
    for step, _ in enumerate(_trajectory(model, steps), start=1):
        if ours.maybe_update(step):
            reference.update_parameters(model)
    assert ours.n == int(reference.n_averaged)
    for a, b in zip(ours.avg.tensors(), reference.module.parameters(), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)
    return ours


def test_swa_is_the_arithmetic_mean_of_the_snapshots():
    model = timm.create_model("test_resnet", num_classes=10)
    snapshots = []
    ref = AveragedModel(model)
    ours = WeightAverager(create_rule("swa", AVERAGERS["swa"].Options()), list(model.parameters()), 3, 2, False)
    for step, _ in enumerate(_trajectory(model, 11), start=1):
        if ours.maybe_update(step):
            ref.update_parameters(model)
            snapshots.append([p.detach().clone() for p in model.parameters()])
    assert ours.n == len(snapshots) == 5  # steps 3, 5, 7, 9, 11
    for i, a in enumerate(ours.avg.tensors()):
        torch.testing.assert_close(a, torch.stack([s[i] for s in snapshots]).mean(0), atol=1e-6, rtol=0)
    for a, b in zip(ours.avg.tensors(), ref.module.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_ema_matches_the_reference_recursion(decay):
    model = timm.create_model("test_resnet", num_classes=10)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    _compare(create_rule("ema", AVERAGERS["ema"].Options(decay=decay)), ref, model, steps=15, every=2, start=2)


def test_ema_warmup_follows_timm_model_ema_v3():
    from timm.utils import ModelEmaV3

    rule = create_rule("ema", AVERAGERS["ema"].Options(decay=0.99, warmup=True))
    timm_ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.99, use_warmup=True)
    for n in (1, 5, 50, 5000):  # timm counts steps from 1, with step 1 a copy: our update n is its step n + 1
        assert rule.current_decay(n) == pytest.approx(timm_ema.get_decay(n + 1), abs=1e-12)
    assert rule.current_decay(5000) == 0.99


@pytest.mark.parametrize("name", sorted(AVERAGERS))
def test_every_strategy_keeps_an_fp32_average_with_a_state_dict(name):
    """The shared contract, for each registered strategy: constant weights average to themselves,
    the copy is fp32 whatever the model's dtype, offload puts it on the CPU, and state round-trips."""
    model = timm.create_model("test_resnet", num_classes=10).to(torch.bfloat16)
    options = getattr(AveragingConfig(), name)
    assert dataclasses.is_dataclass(options)
    averager = WeightAverager(create_rule(name, options), list(model.parameters()), 1, 1, offload=True)
    for step in range(1, 6):
        assert averager.maybe_update(step)
    for a, p in zip(averager.avg.tensors(), model.parameters(), strict=True):
        assert a.dtype == torch.float32 and a.device.type == "cpu"
        torch.testing.assert_close(a, p.detach().float(), atol=1e-6, rtol=0)
    state = averager.state_dict()
    other = WeightAverager(create_rule(name, options), list(model.parameters()), 1, 1, offload=False)
    other.load_state_dict(state)
    assert other.n == 5 and other.rule.state_dict() == averager.rule.state_dict()
    for a, b in zip(other.avg.tensors(), averager.avg.tensors(), strict=True):
        assert torch.equal(a, b)


def test_swalr_anneals_to_the_swa_lr():
    rule = create_rule("swa", AVERAGERS["swa"].Options(lr=0.01, anneal_epochs=2, anneal_strategy="linear"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lrs = []
    for since in (0, 5, 10, 20, 40):
        rule.adjust_lr(opt, since, steps_per_epoch=10)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.0775, 0.055, 0.01, 0.01])
