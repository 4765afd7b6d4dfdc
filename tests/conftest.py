"""Shared helpers: run the real entry point as users do (subprocess, accelerate launch)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "launch" / "train.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# `accelerate launch` itself, as `bnswa train` runs it: `python -m accelerate.commands.launch` skips the imports the
# `accelerate` CLI makes for its other subcommands (`estimate` imports timm and transformers), about 4 s a launch
# here. The `accelerate` binary is still run as users type it by test_multinode.py and test_sweeps.py.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(CI="true", PYTHONPATH=str(ROOT), **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_config.yaml --num_processes N launch/train.py ARGS`."""
    cmd = [*LAUNCH, "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", str(nproc),
           "--main_process_port", str(free_port()), str(ENTRY), *args]
    return subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def start_launch(args: list[str], out: Path, extra=(), launcher=()) -> subprocess.Popen:
    """A 2-process launch left running, for tests that signal it."""
    cmd = [*LAUNCH, *launcher, "--config_file", str(ROOT / "accelerate_config.yaml"), "--main_process_port",
           str(free_port()), str(ENTRY), *args, f"output.dir={out}", *extra]
    return subprocess.Popen(cmd, cwd=out.parent, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_workers(proc) -> list:
    """The two training processes under a launcher (psutil.Process)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        found = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if str(ENTRY) in " ".join(c.cmdline()) and "accelerate" not in " ".join(c.cmdline()[:2])]
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("workers did not start")


# Added to a launch that a test stops part-way: one metrics.jsonl record per update, which `wait_update` reads
EVERY_UPDATE = ["logging.interval_steps=1"]


def wait_update(out_dir: Path, update: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until a run launched with EVERY_UPDATE has logged `update` optimizer updates: a test acts at a chosen
    step of training, whatever the start-up took (timed sleeps landed before training or after its end)."""
    path, deadline = out_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before update {update}")
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in reversed(lines[-3:]):
            try:
                if json.loads(line).get("update", 0) >= update:
                    return
            except ValueError:  # a line being written
                continue
        time.sleep(0.05)
    raise AssertionError(f"update {update} not reached in {timeout} s")


def read_metrics(out_dir: Path) -> list[dict]:
    """The epoch records (metrics.jsonl also holds `logging.interval_steps` records, which have no `epoch`)."""
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


def read_summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


# What libraries print (warnings, log records, torch elastic's rank prefixes): never on a run's console by default
LIBRARY_LINE = re.compile(r"Warning|WARNING|\[rank\d+\]|built successfully|Setting accelerator|^[WEI]\d{4} ")


def assert_console_is_ours(proc: subprocess.CompletedProcess) -> None:
    """A finished run printed the framework's lines only (framework/reporting/console.py)."""
    foreign = [line for line in (proc.stdout + proc.stderr).splitlines() if LIBRARY_LINE.search(line)]
    assert proc.stderr.strip() == "" and not foreign, (foreign, proc.stderr[-2000:])


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


# 2 processes, DDP, SWA from the middle of epoch 1 and SyncBatchNorm on: all the state a resume must restore.
# timm's test_resnet (BN, residual blocks) trains at 3x resnet18's speed here: 22 updates an epoch either way
REFERENCE_ARGS = [str(ROOT / "recipes" / "quickstart.yaml"), "model.name=test_resnet", "schedule.epochs=2", "bn.mode=sync",
                  "averaging.start=0.4",
                  "logging.wandb.mode=disabled"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted DDP run that resume tests and the DeepSpeed comparison measure against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    check_ok(launch([*REFERENCE_ARGS, f"output.dir={out}"], nproc=2, cwd=out.parent))
    return out


@pytest.fixture(scope="session")
def digits_root():
    from framework.data.loaders import ensure_digits_folder

    return ensure_digits_folder()


def run_in_process(overrides: list[str], recipe: Path = ROOT / "recipes" / "quickstart.yaml") -> dict:
    """`train(resolve_recipe(RECIPE, overrides))` in this process (world size 1, no launcher): for the
    model matrix, where a 2-process launch per cell would cost minutes. Accelerate's process-wide state
    and the SIGTERM handler the run installs are put back afterwards."""
    import signal

    from accelerate.state import AcceleratorState, GradientState, PartialState

    from framework.recipe.resolve import resolve_recipe
    from framework.training.loop import train

    handler = signal.getsignal(signal.SIGTERM)
    try:
        return train(resolve_recipe(recipe, ["logging.wandb.mode=disabled", "resume=never", *overrides]))
    finally:
        signal.signal(signal.SIGTERM, handler)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


@pytest.fixture
def train_in_process():
    return run_in_process
