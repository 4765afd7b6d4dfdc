"""Faults on real 2-process launches: a stop at a random step resumes bit-identically; divergence is refused."""

from __future__ import annotations

import random
import signal
import time

import psutil
import pytest
import torch
from conftest import (
    EVERY_UPDATE,
    REFERENCE_ARGS,
    check_ok,
    launch,
    read_metrics,
    start_launch,
    wait_update,
    wait_workers,
)
from safetensors.torch import load_file

from framework.data.loaders import ShardSampler

pytestmark = pytest.mark.slow
ARGS = REFERENCE_ARGS


@pytest.mark.parametrize("target", ["worker", "launcher"])
def test_sigterm_at_a_random_step_then_resume_is_bit_identical(reference_run, tmp_path, target):
    """Also the same seed's losses across launches: the run up to the stop is a second launch of the reference
    recipe (this replaced a test that launched the reference again only to compare its losses)."""
    out = tmp_path / "run"
    proc = start_launch(ARGS, out, EVERY_UPDATE)
    workers = wait_workers(proc)
    wait_update(out, random.Random(target).randint(3, 40), proc)  # somewhere in epochs 1-2 (22 updates each)
    t0 = time.time()
    (workers[1] if target == "worker" else psutil.Process(proc.pid)).send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - t0 < 25, "all processes must stop, checkpoint and exit within 25 s"
    assert "interrupted: stopped by a signal after" in stdout, stdout[-2000:] + stderr[-2000:]
    ckpts = sorted((out / "checkpoints").glob("epoch-*"))
    assert len(ckpts) == 1 and {p.name for p in ckpts[0].iterdir()} >= {"rank0.json", "rank1.json", "manifest.json"}
    assert not (out / "summary.json").exists()

    resumed = launch([*ARGS, f"output.dir={out}"], nproc=2, cwd=tmp_path)
    check_ok(resumed)
    assert f"resumed from {ckpts[0]}" in resumed.stdout
    a, b = read_metrics(reference_run), read_metrics(out)
    assert [r["epoch"] for r in b] == [1, 2]  # no gaps, no duplicates
    for key in ("train/loss", "eval/online/top1", "eval/online/loss", "eval/averaged/recompute/top1"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key  # bitwise: exact float equality
    for kind in ("online", "averaged"):
        x, y = load_file(reference_run / f"model_{kind}.safetensors"), load_file(out / f"model_{kind}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), kind  # weights and BN buffers


def _bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_resume_with_another_world_size_keeps_the_schedule_and_checkpoint_order(train_in_process, tmp_path):
    """2 processes stopped inside epoch 1, resumed on 1. The defects: names counted steps of the old world
    (the resumed run's newer checkpoints sorted before the old one and pruning deleted them), timm's
    scheduler came back in the old world's update units, and every process wrote the replicated state."""
    out = tmp_path / "run"
    proc = start_launch(ARGS, out, ["checkpoint.every=12", "checkpoint.unit=steps", "checkpoint.keep=5", "bn.mode=local"])
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    ckpts = sorted((out / "checkpoints").glob("epoch-*"))
    mid = ckpts[0]  # update 12 of 22 in epoch 1, before averaging starts (update 17)
    assert mid.name == "epoch-00000-sample-000000768"  # 12 updates x 2 processes x 32 images
    for p in ckpts:
        if p != mid:
            import shutil

            shutil.rmtree(p)
    (out / "summary.json").unlink()
    one = launch([*ARGS, f"output.dir={out}", "bn.mode=local", "checkpoint.every=12", "checkpoint.unit=steps",
                  "checkpoint.keep=2"], nproc=1, cwd=tmp_path)
    check_ok(one)
    assert "world size 1 (was 2)" in one.stdout
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    kept = sorted((out / "checkpoints").glob("epoch-*"))
    assert len(kept) == 2 and all(p.name > mid.name for p in kept)  # the newest two, by training progress

    # The learning rate at each epoch's end (cosine, warm-up, SWALR from 40%) is an uninterrupted 1-process run's
    ref = tmp_path / "ref"
    train_in_process([*ARGS[1:], "bn.mode=local", f"output.dir={ref}"], recipe=ARGS[0])
    assert [r["train/lr"] for r in records] == [r["train/lr"] for r in read_metrics(ref)]

    # Lean: replicated state once; the 2-process checkpoint weighs what the 1-process one does, plus one
    # process's own part (random streams, BN statistics, position)
    ratio = _bytes(mid) / _bytes(kept[0])
    assert ratio <= 1.1, ratio


@pytest.mark.parametrize("world,per_rank", [(2, 5), (3, 4)])
def test_resharded_epoch_sees_every_sample_once(world, per_rank):
    data = list(range(103))
    old = [ShardSampler(data, world, r, seed=7) for r in range(world)]
    seen = []
    for s in old:
        s.set_epoch(4)
        seen += list(s)[:per_rank]
    for new_world in (1, 2, world):
        rest = []
        for r in range(new_world):
            s = ShardSampler(data, new_world, r, seed=7)
            s.set_epoch(4)
            s.skip(world * per_rank)
            rest += list(s)
            assert len(s) == len(list(s))
        both = seen + rest
        assert len(both) == len(set(both))  # nothing twice
        assert len(set(data) - set(both)) < new_world  # at most drop_last's tail is left out


def test_divergence_is_refused_at_the_same_step_on_every_process(tmp_path):
    out = tmp_path / "run"
    proc = launch([*ARGS, "optimizer.lr=1e6", "averaging.start=0.0", "checkpoint.every=1", "checkpoint.unit=steps",
                   "checkpoint.keep=50", f"output.dir={out}"], nproc=2, cwd=tmp_path)
    assert proc.returncode != 0
    import re

    found = re.findall(r"error: non-finite loss, gradients or BN statistics at step (\d+) \(seen from rank (\d)\)", proc.stderr)
    assert len(found) == 2 and len({step for step, _ in found}) == 1 and {r for _, r in found} == {"0", "1"}, proc.stderr[-3000:]
    from framework.checkpoint.store import load_rank_state

    ckpts = sorted((out / "checkpoints").glob("epoch-*"))
    assert ckpts  # the steps before divergence were checkpointed, and hold only finite values
    for ckpt in ckpts:
        for rank in (0, 1):
            state = load_rank_state(ckpt, rank)
            tensors = [*state["model"].values(), *state["averager"]["swa"]["tensors"].values()]
            assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_sigkill_one_process_torchrun_restarts_and_resume_is_bit_identical(reference_run, tmp_path):
    """SIGKILL gives no chance to checkpoint: torchrun (--max_restarts) restarts the group, which must
    really reconnect, and the run resumes from the newest complete periodic checkpoint."""
    out = tmp_path / "run"
    proc = start_launch(ARGS, out, ["checkpoint.every=5", "checkpoint.unit=steps"], launcher=["--max_restarts", "1"])
    workers = wait_workers(proc)
    deadline = time.time() + 120
    rng = random.Random(0)
    wanted = rng.randint(2, 6)  # kill somewhere after this many complete checkpoints
    while len(list((out / "checkpoints").glob("epoch-*/manifest.json"))) < min(wanted, 2) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 1.0))  # test_resnet: about 10 updates a second
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    a, b = read_metrics(reference_run), read_metrics(out)
    assert [r["epoch"] for r in b] == [1, 2]
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    for kind in ("online", "averaged"):
        x, y = load_file(reference_run / f"model_{kind}.safetensors"), load_file(out / f"model_{kind}.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x), kind


def test_a_hung_process_stops_the_others_at_the_collective_timeout(tmp_path):
    out = tmp_path / "run"
    proc = start_launch(ARGS, out, ["faults.collective_timeout_s=10", *EVERY_UPDATE])
    workers = wait_workers(proc)
    wait_update(out, 5, proc)
    hung = next(w for w in workers if w.environ().get("RANK") == "1")
    other = next(w for w in workers if w is not hung)
    hung.suspend()  # SIGSTOP: alive but silent, the case gloo only notices at the timeout
    t0 = time.time()
    try:
        other.wait(timeout=90)
        waited = time.time() - t0
    finally:
        hung.resume()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert 8 < waited < 40, waited  # the recipe's 10 s, not torch's 30 min
    assert "error: rank 0: lost contact with another process during a collective: rank 1 stopped responding" in stderr, [
        line for line in stderr.splitlines() if "Error" in line or "error" in line]


def test_a_killed_process_is_named_by_the_survivor(tmp_path):
    proc = start_launch(ARGS, tmp_path / "run", EVERY_UPDATE)
    workers = wait_workers(proc)
    wait_update(tmp_path / "run", 5, proc)
    next(w for w in workers if w.environ().get("RANK") == "1").send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: rank 0: lost contact with another process during a collective: rank 1 stopped responding" in stderr, [
        line for line in stderr.splitlines() if "rror" in line]


def test_workers_whose_launcher_is_killed_stop_and_a_relaunch_resumes_exactly(reference_run, tmp_path):
    """torch elastic gives each worker its own session: SIGKILL to the launcher's whole process group left
    them training as orphans, beside the relaunch (epochs written twice). Now they notice, agree on a stop,
    checkpoint and exit, within 30 s; the relaunch resumes from that checkpoint bit-identically."""

    out = tmp_path / "run"
    proc = start_launch(ARGS, out, EVERY_UPDATE)
    workers = wait_workers(proc)
    wait_update(out, random.Random(5).randint(3, 40), proc)
    proc.send_signal(signal.SIGKILL)  # the launcher; its workers are in sessions of their own
    t0 = time.time()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"{len(alive)} worker(s) still running 30 s after the launcher died"
    print(f"workers gone {time.time() - t0:.1f} s after the launcher was killed")
    stdout, _ = proc.communicate(timeout=30)
    assert "the launcher (process" in stdout and "is gone" in stdout, stdout[-2000:]

    resumed = launch([*ARGS, f"output.dir={out}"], nproc=2, cwd=tmp_path)
    check_ok(resumed)
    assert "resumed from" in resumed.stdout
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]  # one record per epoch
    for kind in ("online", "averaged"):
        x, y = load_file(reference_run / f"model_{kind}.safetensors"), load_file(out / f"model_{kind}.safetensors")
        assert all(torch.equal(x[k], y[k]) for k in x), kind


def test_an_output_dir_held_by_a_live_run_is_refused_before_anything_starts(tmp_path, capsys):
    """A live holder (this test process holds the lock a run's main process takes) is named; nothing is launched."""
    import os
    import subprocess
    import sys

    from conftest import ENTRY, ROOT, clean_env

    from framework.distributed.output_lock import OutputLock

    out = tmp_path / "run"
    lock = OutputLock(out).acquire()
    try:
        recipe = [str(ROOT / "recipes" / "quickstart.yaml"), f"output.dir={out}"]
        for cmd in ([sys.executable, "-m", "framework", "train", *recipe], [sys.executable, str(ENTRY), *recipe]):
            proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert f"process {os.getpid()}" in proc.stderr and "in use by a live run (host" in proc.stderr
            assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        lock.release()
    # The holder died without releasing: its line is left, the lock is free, and the next run takes over
    (out / ".lock").write_text("host elsewhere, process 1, since yesterday\n")
    OutputLock(out).acquire().release()
    assert "taking over the lock of a run that ended without releasing it (host elsewhere" in capsys.readouterr().out
    assert (out / ".lock").read_text() == ""  # released cleanly: no holder line
