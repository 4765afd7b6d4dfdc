"""Several machines, tested as two "machines" of one process each on loopback (--num_machines 2)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import (
    ACCELERATE,
    ENTRY,
    ROOT,
    check_ok,
    clean_env,
    free_port,
    launch,
    read_metrics,
    read_summary,
)

pytestmark = pytest.mark.slow
# data.workers=auto counts each machine's cores: the two "machines" here share one machine's 2 cores, so each
# would take a worker, and workers draw augmentation per sample where the main process draws from its streams
ARGS = [str(ROOT / "recipes" / "quickstart.yaml"), "model.name=test_resnet", "schedule.epochs=2", "logging.wandb.mode=disabled", "data.workers=0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    check_ok(launch([*ARGS, f"output.dir={out}"], nproc=2, cwd=out.parent))
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_machines_agree_with_one_machine_of_two_processes(single, tmp_path, engine):
    """Against one machine of 2 DDP processes: two machines under DDP exactly, and under FSDP2 (sharded
    across the machines) within float tolerance of the reduction order."""
    multi, port = tmp_path / "multi", free_port()
    procs = [
        subprocess.Popen(
            [str(ACCELERATE), "launch", "--config_file", str(ROOT / "launch" / "multinode" / "accelerate_multinode.yaml"),
             "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(ENTRY), *ARGS,
             f"backend.type={engine}", f"output.dir={multi}"],
            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        check_ok(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))

    a, b = read_summary(single), read_summary(multi)
    assert b["world_size"] == 2 and b["backend"] == engine
    tolerance = 0 if engine == "ddp" else 1e-6
    assert [r["train/loss"] for r in read_metrics(multi)] == pytest.approx(
        [r["train/loss"] for r in read_metrics(single)], rel=tolerance, abs=tolerance)
    assert b["eval"]["online"]["top1"] == a["eval"]["online"]["top1"]
    assert b["eval"]["averaged"]["recompute"]["top1"] == a["eval"]["averaged"]["recompute"]["top1"]
