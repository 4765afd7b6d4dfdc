"""Checkpoints: atomic and checksummed, incomplete or corrupt ones skipped, pickles refused, keep-N."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from framework.checkpoint.store import (
    CheckpointError,
    check_checkpoint,
    checkpoint_tag,
    decode,
    encode,
    load_rank_state,
    resolve_resume,
    save_checkpoint,
)
from framework.distributed.faults import NonFiniteError, StepControl


def _tag(n: int) -> str:
    return checkpoint_tag(0, n)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(4, 3, generator=g)}, "optimizer": {"state": {0: {"m": torch.ones(2)}}, "groups": [{"lr": 0.1}]},
            "rng": (3, tuple(range(5)), None), "position": {"epoch": 1, "step_in_epoch": step}}


def test_state_round_trips_through_safetensors_and_json():
    import numpy as np

    state = {**_state(3), "np": np.random.RandomState(0).get_state()}
    tensors: dict = {}
    plain = json.loads(json.dumps(encode(state, tensors)))  # plain data only
    back = decode(plain, tensors)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["optimizer"]["state"][0]["m"].tolist() == [1.0, 1.0]  # int keys survive
    assert back["rng"] == (3, (0, 1, 2, 3, 4), None)  # tuples survive
    assert back["np"][0] == "MT19937" and (back["np"][1] == state["np"][1]).all()
    with pytest.raises(CheckpointError, match="only tensors and plain data"):
        encode({"f": open}, {})


def test_keep_prunes_only_after_the_next_is_complete(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, _tag(step), _state(step), rank=0, world_size=1, keep=2, meta={})
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == [_tag(30), _tag(40)]
    assert not list(tmp_path.glob(".tmp-*"))
    saved = load_rank_state(tmp_path / _tag(40), rank=0)
    assert torch.equal(saved["model"]["w"], _state(40)["model"]["w"])


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path, capsys):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _tag(step), _state(step), rank=0, world_size=1, keep=5, meta={})
    (tmp_path / _tag(3) / "manifest.json").unlink()  # killed before the manifest: incomplete
    data = tmp_path / _tag(2) / "rank0.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit in the tensor data
    data.write_bytes(bytes(raw))
    assert "incomplete" in check_checkpoint(tmp_path / _tag(3))
    assert "corrupt" in check_checkpoint(tmp_path / _tag(2))
    assert resolve_resume("auto", tmp_path).name == _tag(1)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and _tag(2) in out and _tag(3) in out
    with pytest.raises(CheckpointError, match="corrupt"):
        resolve_resume(str(tmp_path / _tag(2)), tmp_path)
    assert resolve_resume("never", tmp_path) is None


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="refusing a pickle"):
        resolve_resume(str(evil), tmp_path)
    ckpt = save_checkpoint(tmp_path / "ck", _tag(1), _state(1), rank=0, world_size=1, keep=1, meta={})
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(_Evil()))  # a pickle slipped into a checkpoint
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        load_rank_state(ckpt, rank=0)
    assert not marker.exists()


def test_an_overflow_verdict_is_the_scalers_and_divergence_is_still_caught():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 2.0])  # unscaled gradients of an overflowed fp16 step
    control = StepControl("raise", 0, torch.device("cpu"))
    assert not control.check(torch.tensor(0.5), [p], 1, overflow=torch.tensor(True)) and control.overflow
    assert control.skipped == 0  # not judged: the scaler skips it
    with pytest.raises(NonFiniteError, match="non-finite loss"):  # a non-finite loss is no overflow
        control.check(torch.tensor(float("nan")), [p], 2, overflow=torch.tensor(False))
    with pytest.raises(NonFiniteError):  # nor are infinite gradients the scaler did not claim
        control.check(torch.tensor(0.5), [p], 3, overflow=torch.tensor(False))


def test_deferred_control_reads_a_step_late_and_raises_before_anything_is_kept():
    """Under `raise` without a loss scaler the flags of step t are read at step t+1 (no GPU stall) or at
    resolve(), which runs before every checkpoint, evaluation and export."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    control = StepControl("raise", 0, torch.device("cpu"), deferred=True)
    assert control.check(torch.tensor(float("nan")), [p], step=7)  # not read yet
    with pytest.raises(NonFiniteError, match="at step 7"):
        control.resolve()
    control.check(torch.tensor(float("nan")), [p], step=8)
    with pytest.raises(NonFiniteError, match="at step 8"):
        control.check(torch.tensor(1.0), [p], step=9)  # the next step reads it
    control.stop_requested = True
    assert control.check(torch.tensor(1.0), [p], step=10) and not control.stop_agreed
    control.resolve()
    assert control.stop_agreed
    assert not StepControl("skip", 0, torch.device("cpu"), deferred=True).deferred  # a refusal must wait


def test_step_control_refuses_non_finite_steps():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    raising = StepControl("raise", 0, torch.device("cpu"))
    assert raising.check(torch.tensor(1.0), [p], step=1)
    with pytest.raises(NonFiniteError, match="non-finite loss, gradients or BN statistics at step 2"):
        raising.check(torch.tensor(float("nan")), [p], step=2)
    skipping = StepControl("skip", 2, torch.device("cpu"))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])  # finite loss, infinite gradient
    assert not skipping.check(torch.tensor(1.0), [p], 1) and not skipping.check(torch.tensor(1.0), [p], 2)
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        skipping.check(torch.tensor(1.0), [p], 3)


def _zero3_layout(sizes: dict[str, int], world: int, rank: int):
    """ZeRO-3's layout: each parameter cut into `world` equal pieces (the last padded), one flat partition."""
    master, averaged, offset = [], [], 0
    for j, (name, numel) in enumerate(sizes.items()):
        part = -(-numel // world)
        if numel > rank * part:
            n = min(part, numel - rank * part)
            master.append((name, rank * part, 0, offset, n))
            averaged.append((name, rank * part, j, 0, n))
        offset += part
    return {"master": master, "averaged": averaged, "optim_order": [0], "master_sizes": [offset]}


def _partition(full: dict, layout: dict, key: str, sizes: list[int]) -> list[torch.Tensor]:
    out = [torch.zeros(n) for n in sizes]
    for name, p_off, idx, t_off, n in layout[key]:
        out[idx][t_off:t_off + n] = full[name][p_off:p_off + n]
    return out


def test_zero_partitions_are_re_cut_for_another_world_size():
    """Weights, momentum and averages saved by 2 processes, re-cut for 3: each new partition holds
    exactly its slice of every parameter; scalars come from old rank 0."""
    from framework.checkpoint.zero_reshard import reshard

    sizes = {"a": 10, "b": 7, "c": 1}
    g = torch.Generator().manual_seed(0)
    weights, momentum, avg = ({k: torch.randn(n, generator=g) for k, n in sizes.items()} for _ in range(3))
    old = []
    for rank in range(2):
        lay = _zero3_layout(sizes, 2, rank)
        old.append({
            "layout": lay, "model": {}, "engine": {"global_steps": 9},
            "optimizer": {"fp32_flat_groups": _partition(weights, lay, "master", lay["master_sizes"]),
                          "optimizer_state_dict": {"state": {0: {"momentum_buffer": _partition(momentum, lay, "master", lay["master_sizes"])[0],
                                                                 "step": torch.tensor(9.0)}},  # Adam's 0-dim step
                                                   "param_groups": [{"params": [0], "lr": 0.05}]},
                          "loss_scaler": {"cur_scale": 1.0}},
            "averager": {"swa": {"n": 4, "tensors": {f"t{j}": t for j, t in enumerate(
                _partition(avg, lay, "averaged", [-(-n // 2) for n in sizes.values()]))}}},
        })
    for rank in range(3):
        lay = _zero3_layout(sizes, 3, rank)
        avg_sizes = [-(-n // 3) for n in sizes.values()]
        live = {"optimizer": {"fp32_flat_groups": [torch.zeros(lay["master_sizes"][0])],
                              "optimizer_state_dict": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]},
                              "loss_scaler": {"cur_scale": 2.0}}}
        new = reshard(old, live, 3, lay, avg_sizes)
        assert torch.equal(new["optimizer"]["fp32_flat_groups"][0], _partition(weights, lay, "master", lay["master_sizes"])[0])
        state = new["optimizer"]["optimizer_state_dict"]
        assert torch.equal(state["state"][0]["momentum_buffer"], _partition(momentum, lay, "master", lay["master_sizes"])[0])
        assert state["state"][0]["step"] == 9 and state["param_groups"] == [{"params": [0], "lr": 0.05}]
        assert new["optimizer"]["loss_scaler"] == {"cur_scale": 1.0} and new["averager"]["swa"]["n"] == 4
        expected = _partition(avg, lay, "averaged", avg_sizes)
        assert all(torch.equal(new["averager"]["swa"]["tensors"][f"t{j}"], t) for j, t in enumerate(expected))


@pytest.fixture
def small_filesystem(tmp_path):
    """A 6 MB tmpfs: room for one checkpoint of test_resnet (weights, momentum, averaged copy), not two."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])  # fsdp: DCP's writer fails inside the same atomic store
def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_checkpoint(small_filesystem, backend):
    import subprocess
    import sys

    from conftest import ENTRY, ROOT, clean_env

    out = small_filesystem / "run"
    proc = subprocess.run([sys.executable, str(ENTRY), str(ROOT / "recipes" / "quickstart.yaml"), "model.name=test_resnet",
                           "schedule.epochs=3", "checkpoint.every=1", "logging.wandb.mode=disabled", f"output.dir={out}",
                           f"backend.type={backend}"],
                          cwd=small_filesystem, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    first = out / "checkpoints" / checkpoint_tag(1, 0)
    lines = [line for line in proc.stderr.splitlines() if "could not be written" in line]
    assert len(lines) == 1, proc.stderr
    assert f"checkpoint {out / 'checkpoints' / checkpoint_tag(2, 0)} could not be written" in lines[0]
    assert "No space left on device" in lines[0] and f"newest intact checkpoint: {first}" in lines[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [first.name]  # no partial folder left
    assert check_checkpoint(first) is None


def test_a_checkpoint_by_averager_name_is_told_from_the_unnamed_one_by_shape_not_by_a_name():
    """Before several averagers, a checkpoint held one averager's state unnamed; an averager named `n` (the
    state's count key) must not be taken for it."""
    from types import SimpleNamespace

    from framework.checkpoint.resume import by_track

    state = {"n": 7, "rule": {}, "tensors": {"t0": torch.ones(2)}}
    named = {"averager": {"n": state, "ema": state}, "sources": {"n": {"initial": {}}, "ema": {}}}
    tracks = [SimpleNamespace(name="n"), SimpleNamespace(name="ema")]
    assert by_track(dict(named), tracks) == named
    legacy = by_track({"averager": state, "sources": {"initial": {}}}, [SimpleNamespace(name="swa")])
    assert legacy == {"averager": {"swa": state}, "sources": {"swa": {"initial": {}}}}
    assert by_track({"averager": None, "sources": {}}, []) == {"averager": {}, "sources": {}}
