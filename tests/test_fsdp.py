"""FSDP2 (backend.type: fsdp) against DDP on the same recipe and seed, 2 gloo processes on CPU: the
quickstart's SGD in fp32 with SyncBN and SWA (test_resnet), and test_vit with EMA, accumulation and
norm clipping; shard-local averaging; DCP checkpoints resumed after SIGTERM and after the launcher's
SIGKILL, and on another world size (2 to 1, 1 to 2) through DCP's resharding."""

from __future__ import annotations

import json
import random
import signal

import psutil
import pytest
from conftest import (
    EVERY_UPDATE,
    REFERENCE_ARGS,
    assert_console_is_ours,
    check_ok,
    launch,
    read_metrics,
    read_summary,
    start_launch,
    wait_update,
    wait_workers,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
FSDP = ["backend.type=fsdp"]
CKPT = ["checkpoint.every=11", "checkpoint.unit=steps", "checkpoint.keep=9"]  # 4 checkpoints, 2 per epoch
# after a reshard the averaged weights' BN statistics come from the new world's own recompute pass
STATS = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    # export.best adds the best epoch's live weights, gathered mid-run; training is the same as without it
    proc = launch([*REFERENCE_ARGS, *FSDP, *CKPT, "export.best=eval/online/top1", f"output.dir={out}"],
                  nproc=2, cwd=out.parent)
    check_ok(proc)
    return out, proc


def _weights(a, b, kind: str, skip=()) -> float:
    x, y = load_file(a / f"model_{kind}.safetensors"), load_file(b / f"model_{kind}.safetensors")
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x if not k.endswith(skip))


def _same_run(a, b, skip=()) -> None:
    """Bitwise: the same epoch records and the same exported weights (and BN buffers)."""
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in rb] == [1, 2]
    for key in ("train/loss", "eval/online/top1", "eval/online/loss", "eval/averaged/recompute/top1"):
        assert [r.get(key) for r in ra] == [r.get(key) for r in rb], key
    for kind in ("online", "averaged"):
        assert _weights(a, b, kind, skip) == 0.0, kind


def test_fsdp_matches_ddp_with_sync_bn_and_swa(reference_run, fsdp_run):
    out, proc = fsdp_run
    assert_console_is_ours(proc)
    ddp, fsdp = read_summary(reference_run), read_summary(out)
    assert fsdp["backend"] == "fsdp" and fsdp["world_size"] == 2
    # the same arithmetic on shards: measured equal to the last bit here; the bar allows reduction order
    for kind in ("online", "averaged"):
        assert _weights(reference_run, out, kind) < 1e-5, kind
    for a, b in zip(read_metrics(reference_run), read_metrics(out), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6, abs=1e-7)
    assert fsdp["eval"]["online"]["top1"] == pytest.approx(ddp["eval"]["online"]["top1"], abs=1e-9)
    for source, r in ddp["eval"]["averaged"].items():  # every row of the table
        assert fsdp["eval"]["averaged"][source]["top1"] == pytest.approx(r["top1"], abs=1e-9), source
    assert "averaged + recompute" in proc.stdout
    # shard-local averaging: nothing sent, half of DDP's fp32 copy per process (shards are cut on dim 0)
    t, d = fsdp["throughput"], ddp["throughput"]
    assert t["averaging_comm_bytes_per_update"] == 0
    assert 0.45 < t["averaging_state_bytes_per_process"] / d["averaging_state_bytes_per_process"] < 0.55
    digests = fsdp["averaging"]["recompute_bn_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # the pass is identical on every rank
    import timm

    for name in ("model_averaged", "model_best"):
        timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(out / f"{name}.safetensors"))


def test_fsdp_matches_ddp_on_test_vit_with_ema_accumulation_and_clipping(tmp_path):
    """LayerNorm, EMA (its fp32 copy offloaded), 2 batches per update (no reduce-scatter on the inner one), norm
    clipping over the shards, and layer decay (timm's parameter groups by name, on the sharded model)."""
    args = [*REFERENCE_ARGS, "model.name=test_vit", "data.image_size=48", "schedule.epochs=1", "schedule.warmup_epochs=0",
            "averaging.strategy=ema", "optimizer.accumulate_steps=2", "optimizer.clip_grad=0.5", "optimizer.lr=0.05",
            "optimizer.layer_decay=0.75", "averaging.offload=true", "export.best=eval/averaged/none/top1"]
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", FSDP)):
        runs[name] = tmp_path / name
        check_ok(launch([*args, *extra, f"output.dir={runs[name]}"], nproc=2, cwd=tmp_path))
    for kind in ("online", "averaged"):
        assert _weights(runs["ddp"], runs["fsdp"], kind) < 1e-5, kind
    a, b = read_metrics(runs["ddp"]), read_metrics(runs["fsdp"])
    assert [r["train/loss"] for r in b] == pytest.approx([r["train/loss"] for r in a], rel=1e-5)
    ddp, fsdp = read_summary(runs["ddp"]), read_summary(runs["fsdp"])
    assert list(fsdp["eval"]["averaged"]) == ["none"]
    assert fsdp["eval"]["averaged"]["none"]["top1"] == pytest.approx(ddp["eval"]["averaged"]["none"]["top1"], abs=1e-9)
    assert fsdp["throughput"]["averaging_comm_bytes_per_update"] == 0
    # the best epoch's averaged weights, swapped into the shards and gathered mid-run, as DDP exported them
    assert _weights(runs["ddp"], runs["fsdp"], "best") < 1e-5


@pytest.mark.parametrize("target", ["worker-sigterm", "launcher-sigkill"])
def test_fsdp_stop_then_resume_auto_is_bit_identical(fsdp_run, tmp_path, target):
    out = tmp_path / "run"
    proc = start_launch([*REFERENCE_ARGS, *FSDP], out, EVERY_UPDATE)
    workers = wait_workers(proc)
    wait_update(out, random.Random(target).randint(3, 40), proc)
    if target == "worker-sigterm":
        workers[1].send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        assert "interrupted: stopped by a signal after" in stdout, stdout[-2000:] + stderr[-2000:]
    else:  # the launcher; its workers notice, agree on a stop and checkpoint
        proc.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive
        proc.communicate(timeout=30)
    ckpts = sorted((out / "checkpoints").glob("epoch-*"))
    assert len(ckpts) == 1 and any(f.suffix == ".safetensors" for f in (ckpts[0] / "dcp").iterdir())
    assert not [f for f in ckpts[0].rglob("*") if f.suffix in (".distcp", ".metadata", ".pt")]  # no pickle on disk
    resumed = launch([*REFERENCE_ARGS, *FSDP, f"output.dir={out}", "resume=auto"], nproc=2, cwd=tmp_path)
    check_ok(resumed)
    assert f"resumed from {ckpts[0]}" in resumed.stdout
    _same_run(fsdp_run[0], out)


def test_fsdp_resumes_on_one_process_through_dcp_resharding(fsdp_run, tmp_path):
    """2 to 1: from inside epoch 2 the run finishes on the new world's schedule; from the last update of
    training the weights come back exactly (no code of ours cuts a tensor)."""
    ckpts = sorted((fsdp_run[0] / "checkpoints").glob("epoch-*"))
    assert [c.name for c in ckpts][2] == "epoch-00001-sample-000000704" and len(ckpts) == 4
    mid = tmp_path / "mid"
    one = launch([*REFERENCE_ARGS, *FSDP, f"output.dir={mid}", f"resume={ckpts[2]}"], nproc=1, cwd=tmp_path)
    check_ok(one)
    assert "world size 1 (was 2): weights and optimizer resharded by torch.distributed.checkpoint" in one.stdout
    records = read_metrics(mid)
    # epoch 1's record is the 2-process run's, from the checkpoint; epoch 2 finishes on one process
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["train/lr"] == read_metrics(fsdp_run[0])[-1]["train/lr"]
    # the schedule goes on in the new world's updates: the 2-process run's last 11 updates (704 samples) are 22 of
    # one process's (733 images left in the epoch, batch 32), each an averaging update
    assert read_summary(mid)["averaging"]["updates"] == read_summary(fsdp_run[0])["averaging"]["updates"] - 11 + 22
    end = tmp_path / "end"
    check_ok(launch([*REFERENCE_ARGS, *FSDP, f"output.dir={end}", f"resume={ckpts[-1]}"], nproc=1, cwd=tmp_path))
    assert _weights(fsdp_run[0], end, "online") == 0.0
    assert _weights(fsdp_run[0], end, "averaged", skip=STATS) == 0.0


def test_fsdp_one_process_checkpoint_resumes_on_two(tmp_path):
    short = [*REFERENCE_ARGS, *FSDP, "schedule.epochs=1", "schedule.warmup_epochs=0", "data.train_subset=640"]
    one = tmp_path / "one"
    check_ok(launch([*short, "checkpoint.every=1", f"output.dir={one}"], nproc=1, cwd=tmp_path))
    ckpt = sorted((one / "checkpoints").glob("epoch-*"))[-1]
    assert json.loads((ckpt / "manifest.json").read_text())["world_size"] == 1
    two = tmp_path / "two"
    proc = launch([*short, f"output.dir={two}", f"resume={ckpt}"], nproc=2, cwd=tmp_path)
    check_ok(proc)
    assert "world size 2 (was 1)" in proc.stdout
    assert _weights(one, two, "online") == 0.0
    assert _weights(one, two, "averaged", skip=STATS) == 0.0
    assert read_metrics(two)[-1]["eval/online/top1"] == read_metrics(one)[-1]["eval/online/top1"]
