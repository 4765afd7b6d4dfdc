"""BatchNorm: SyncBN on gloo equals BN over the concatenated batch; recompute equals one process over the union."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT, clean_env, free_port

from framework.bn import BN_MODES, bn_buffers
from framework.bn.recompute import recompute_bn_stats

PER_RANK, WORLD = 4, 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("bn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port", str(free_port()),
           str(ROOT / "tests" / "dist" / "bn_checks.py"), str(out)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", ["bn", "bnact"])
def test_sync_equals_plain_bn_over_the_concatenated_batch(ranks, name):
    g = torch.Generator().manual_seed(1)
    x_all = (torch.randn(PER_RANK * WORLD, 6, 5, 5, generator=g) * 3 + 2).requires_grad_(True)
    grad_all = torch.randn(x_all.shape, generator=g)
    for layer_name, layer in (("bn", torch.nn.BatchNorm2d(6)), ("bnact", timm.layers.BatchNormAct2d(6, act_layer="silu"))):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-0.5, 0.5, generator=g)
        if layer_name == name:
            break
    layer.train()
    y = layer(x_all)
    (y * grad_all).sum().backward()
    for r in range(WORLD):
        mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
        torch.testing.assert_close(ranks[r][f"sync_{name}_out"], y.detach()[mine], atol=1e-5, rtol=0)
        torch.testing.assert_close(ranks[r][f"sync_{name}_grad"], x_all.grad[mine], atol=1e-5, rtol=0)
        torch.testing.assert_close(ranks[r][f"sync_{name}_running"], torch.stack([layer.running_mean, layer.running_var]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", sorted(BN_MODES))
def test_recompute_with_two_processes_equals_one_process_over_the_union(ranks, mode):
    from dist.bn_checks import data

    batches = data(2, PER_RANK * WORLD)
    if mode == "sync":  # one process sees each global batch whole
        union = [(b, None) for b in batches]
    else:  # one process sees every rank's batch, each normalised on its own
        union = [(b[r * PER_RANK:(r + 1) * PER_RANK], None) for b in batches for r in range(WORLD)]
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10)
    recompute_bn_stats(model, union)
    expected = bn_buffers(model)
    for r in range(WORLD):
        for got, want in zip(ranks[r][f"recompute_{mode}"], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(ranks[0][f"recompute_{mode}"], ranks[1][f"recompute_{mode}"], strict=True):
        assert torch.equal(a, b)  # identical on every process, not merely close


def test_recompute_is_the_population_variance_not_the_mean_of_batch_variances():
    """Batches with different means: the population variance includes the spread of the means."""
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(1))
    bn[0].num_batches_tracked.fill_(7)  # training steps so far
    batches = [(torch.full((4, 1, 2, 2), v) + torch.randn(4, 1, 2, 2) * 0.1, None) for v in (-2.0, 2.0)]
    recompute_bn_stats(bn, batches)
    assert bn[0].num_batches_tracked.item() == 7  # an evaluation pass does not count as training
    allx = torch.cat([b for b, _ in batches])
    torch.testing.assert_close(bn[0].running_mean, allx.mean().view(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(bn[0].running_var, allx.var(unbiased=True).view(1), atol=1e-5, rtol=0)
    assert bn[0].running_var.item() > 3.5  # update_bn would give about 0.01


@pytest.mark.parametrize("name", ["test_efficientnet", "regnetx_002"])
@pytest.mark.parametrize("converter", ["gloo", "timm"])
def test_conversion_keeps_timm_fused_activations(name, converter):
    from timm.layers import BatchNormAct2d, convert_sync_batchnorm

    from framework.bn.gloo_sync import convert_gloo_sync_batchnorm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        converted = convert_gloo_sync_batchnorm(model) if converter == "gloo" else convert_sync_batchnorm(model)
        after = converted.eval()(x)
    assert torch.equal(before, after)
    # torch's own converter drops the activation: outputs change (why we never use it)
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model(name, num_classes=10).eval())
    torch.manual_seed(0)
    fresh = timm.create_model(name, num_classes=10).eval()
    plain.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert (plain.eval()(x) - fresh(x)).abs().max() > 1e-3


def test_comm_meter_counts_a_real_collective(ranks):
    for r in range(WORLD):
        assert ranks[r]["comm_meter"].tolist() == [40, 1]  # ten float32 all-reduced, once
