"""DeepSpeed ZeRO 1-3 against DDP: same recipe, seed and data, SGD in fp32, SyncBN and SWA from the
middle of epoch 1, 2 gloo processes on CPU; and a ZeRO-3 run killed and resumed."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
import torch
from conftest import (
    REFERENCE_ARGS,
    assert_console_is_ours,
    check_ok,
    launch,
    read_metrics,
    read_summary,
    start_launch,
    wait_workers,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ARGS = REFERENCE_ARGS  # the quickstart's SGD in fp32
BACKENDS = {"ddp": ["backend.type=ddp"], **{f"zero{z}": ["backend.type=deepspeed", f"backend.zero_stage={z}"] for z in (1, 2, 3)}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_run):
    out = {"ddp": reference_run}  # the same recipe under DDP
    for name, args in BACKENDS.items():
        if name == "ddp":
            continue
        run_dir = tmp_path_factory.mktemp(name) / "run"
        proc = launch([*ARGS, f"output.dir={run_dir}", *args], nproc=2, cwd=run_dir.parent)
        check_ok(proc)
        assert_console_is_ours(proc)  # DeepSpeed's own lines stay off the console too (issue 22)
        out[name] = run_dir
    return out


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_stages_give_ddps_averaged_weights_and_accuracy(runs, stage):
    ddp, zero = read_summary(runs["ddp"]), read_summary(runs[stage])
    assert (zero["backend"], zero["zero_stage"], ddp["zero_stage"]) == ("deepspeed", int(stage[-1]), None)
    assert zero["eval"]["online"]["top1"] == pytest.approx(ddp["eval"]["online"]["top1"], abs=1e-9)
    for source, r in ddp["eval"]["averaged"].items():
        assert zero["eval"]["averaged"][source]["top1"] == pytest.approx(r["top1"], abs=1e-9), source
    a, b = load_file(runs["ddp"] / "model_averaged.safetensors"), load_file(runs[stage] / "model_averaged.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


def test_zero3_averaging_is_shard_local(runs):
    ddp, z3 = read_summary(runs["ddp"])["throughput"], read_summary(runs["zero3"])["throughput"]
    full = ddp["averaging_state_bytes_per_process"]  # DDP holds the whole fp32 model
    assert 0.45 <= z3["averaging_state_bytes_per_process"] / full <= 0.55
    assert z3["averaging_comm_bytes_per_update"] == 0 and ddp["averaging_comm_bytes_per_update"] == 0
    assert read_summary(runs["zero3"])["averaging"]["updates"] > 0


def test_zero3_export_loads_with_timm_alone(runs):
    import timm

    model = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(runs["zero3"] / "model_averaged.safetensors"))
    reference = load_file(runs["ddp"] / "model_averaged.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_bn_buffers_identical_across_processes_after_recompute(runs, name):
    digests = read_summary(runs[name])["averaging"]["recompute_bn_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_zero3_sigkill_one_process_torchrun_restarts_and_resume_is_bit_identical(runs, tmp_path):
    """Killed at a random step after a periodic checkpoint; torchrun restarts both processes, which
    load their own ZeRO-3 partitions (no pickle) and finish exactly like the uninterrupted run."""
    out = tmp_path / "run"
    proc = start_launch([*ARGS, *BACKENDS["zero3"]], out, ["checkpoint.every=11", "checkpoint.unit=steps", "checkpoint.engine_copy=true"],
                        launcher=["--max_restarts", "1"])
    workers = wait_workers(proc)
    rng = random.Random(3)
    deadline = time.time() + 180
    while not list((out / "checkpoints").glob("epoch-*/manifest.json")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 1.0))  # test_resnet: about 10 updates a second
    next(w for w in workers if w.environ().get("RANK") == "1").send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout, stdout[-2000:]
    a, b = read_metrics(runs["zero3"]), read_metrics(out)
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("train/loss", "eval/online/top1", "eval/averaged/recompute/top1"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key  # bitwise
    for kind in ("online", "averaged"):
        x, y = load_file(runs["zero3"] / f"model_{kind}.safetensors"), load_file(out / f"model_{kind}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), kind  # weights and BN buffers

    # The last checkpoint is the end of training; 1 process re-cuts the 2 processes' ZeRO-3 partitions
    ckpt = sorted((out / "checkpoints").glob("epoch-*"))[-1]
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert any(name.startswith("deepspeed/engine/") for name in files)  # the engine's own checkpoint, checksummed
    one_dir = tmp_path / "one"
    one = launch([*ARGS, *BACKENDS["zero3"], f"output.dir={one_dir}", f"resume={ckpt}"], nproc=1, cwd=tmp_path)
    check_ok(one)
    assert "world size 1 (was 2): weights and optimizer re-cut from every old process's partitions" in one.stdout
    assert read_metrics(one_dir)[-1]["eval/online/top1"] == a[-1]["eval/online/top1"]
    x, y = load_file(runs["zero3"] / "model_online.safetensors"), load_file(one_dir / "model_online.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    # averaged weights too; their recomputed BN statistics come from this world size's own pass
    x, y = load_file(runs["zero3"] / "model_averaged.safetensors"), load_file(one_dir / "model_averaged.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x if "running_" not in k)


def test_zero2_accumulates_updates_as_ddp_does(tmp_path):
    """3 batches of 16 per update and 44 batches per process: the epoch's last update takes 2. ZeRO-2's
    partitioned gradients, reduced and stepped on each update's last batch only and never divided again
    by the engine, give DDP's weights (a model without BN: no statistics to tell the backends apart)."""
    from framework.recipe.schema import BackendConfig
    from framework.training.builders import create_deepspeed_config

    assert create_deepspeed_config(BackendConfig(type="deepspeed", zero_stage=2), 16, None, 3)["gradient_accumulation_steps"] == 3
    args = [*ARGS, "model.name=test_vit", "data.batch_size=16", "optimizer.accumulate_steps=3", "averaging.start=0.5"]
    runs = {}
    for name in ("ddp", "zero2"):
        out = tmp_path / name
        check_ok(launch([*args, *BACKENDS[name], f"output.dir={out}"], nproc=2, cwd=tmp_path))
        runs[name] = out
    for file in ("model_online.safetensors", "model_averaged.safetensors"):
        a, b = load_file(runs["ddp"] / file), load_file(runs["zero2"] / file)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=f"{file}: {k}")
    assert [r["train/loss"] for r in read_metrics(runs["zero2"])] == pytest.approx(
        [r["train/loss"] for r in read_metrics(runs["ddp"])], rel=1e-5)


def test_zero3_runs_several_averagers_each_shard_local(runs, tmp_path):
    """SWA (as in the single run) and an EMA beside it under ZeRO-3: each keeps 1/N of its fp32 copy per
    process and sends nothing; the SWA copy is the single run's, bit for bit (the EMA sets no rate). Its
    last checkpoint, resumed by one process, re-cuts each averager's partitions by name: both exports
    hold the two-process run's averaged weights bit for bit."""
    import json

    swa = {"strategy": "swa", "start": 0.4, "swa": {"lr": 0.02, "anneal_epochs": 1}}
    ema = {"strategy": "ema", "start": 0.4, "ema": {"decay": 0.9}}
    args = [*ARGS, *BACKENDS["zero3"], f"averaging={json.dumps([swa, ema])}", "checkpoint.every=1"]
    out = tmp_path / "run"
    check_ok(launch([*args, f"output.dir={out}"], nproc=2, cwd=tmp_path))
    one, last = tmp_path / "one", sorted((out / "checkpoints").glob("epoch-*"))[-1]  # the end of training
    proc = launch([*args, f"output.dir={one}", f"resume={last}"], nproc=1, cwd=tmp_path)
    check_ok(proc)
    assert "world size 1 (was 2): weights and optimizer re-cut" in proc.stdout, proc.stdout[-2000:]
    for name in ("swa", "ema"):
        a, b = load_file(out / f"model_averaged-{name}.safetensors"), load_file(one / f"model_averaged-{name}.safetensors")
        weights = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]  # BN: a new pass
        assert a.keys() == b.keys() and weights and all(torch.equal(a[k], b[k]) for k in weights), name
    both, single = read_summary(out), read_summary(runs["zero3"])
    one = single["averaging"]["state_bytes_per_process"]
    assert both["averaging"]["averagers"]["swa"]["state_bytes_per_process"] == one
    assert both["averaging"]["state_bytes_per_process"] == 2 * one and both["averaging"]["comm_bytes_per_update"] == 0
    a, b = load_file(runs["zero3"] / "model_averaged.safetensors"), load_file(out / "model_averaged-swa.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert both["eval"]["averaged"]["swa"]["recompute"]["top1"] == single["eval"]["averaged"]["recompute"]["top1"]
