"""`bnswa train RECIPE [overrides] [--num-processes N]`: check the recipe here, then start the launch.

The recipe is resolved in this process first, so bad input ends with our one-line errors and
exit 2, before torch elastic exists to add its failure report. Then this process becomes
`accelerate launch --config_file accelerate_config.yaml --num_processes N framework/entry/train.py ...`,
with the package's own files, so an installed package runs the same way as a clone
(exec: signals reach the launcher directly). On CPU, torch elastic gives each worker one thread
unless OMP_NUM_THREADS is set; here each of N processes gets cores / N.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # installed or in a clone: the entry scripts and configs ship in it
ACCELERATE_CONFIG = PACKAGE / "configs" / "accelerate_config.yaml"  # the clone's root accelerate_config.yaml links here
USAGE = "usage: bnswa train RECIPE.yaml [key=value | --key=value ...] [--num-processes N] [--verbose]"


def _pop_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """`--name N` or `--name=N` (launcher options, not recipe keys), removed from argv."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def resolve_launch(num_processes: str | None, cuda_devices: int, cores: int, env: dict) -> tuple[int, dict]:
    """Process count (the option, else one per GPU, else accelerate_config's) and the workers' environment."""
    if num_processes is not None:
        if not num_processes.isdigit() or int(num_processes) < 1:
            raise ValueError(f"--num-processes = {num_processes!r}: expected a positive integer")
        n = int(num_processes)
    elif cuda_devices:
        n = cuda_devices
    else:
        import yaml

        n = int(yaml.safe_load(ACCELERATE_CONFIG.read_text())["num_processes"])
    env = dict(env)
    if not cuda_devices and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cores // n))
    return n, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_main(argv: list[str]) -> int:
    from framework.recipe.cli import USER_ERROR, load_or_exit
    from framework.recipe.errors import print_errors

    num_processes, argv = _pop_option(argv, "--num-processes")
    if "--verbose" in argv:  # every library's lines too: the recipe key, so each worker reads it
        argv = [a for a in argv if a != "--verbose"] + ["logging.verbose=true"]
    if not argv:
        print_errors([USAGE])
        return USER_ERROR
    launch = plan_launch(num_processes)
    if launch is None:
        return USER_ERROR
    recipe = load_or_exit(argv, world_size=launch[0])  # one line per problem and exit 2; nothing written or launched
    from framework.distributed.output_lock import OutputBusy, check_output_free

    try:
        check_output_free(Path(recipe.output.dir))  # the workers take the lock; refuse here, before any launch
    except OutputBusy as err:
        print_errors([str(err)])
        return USER_ERROR
    return exec_launch("train.py", argv, launch)


def plan_launch(num_processes: str | None) -> tuple[int, dict] | None:
    """(process count, workers' environment) for this machine, or None after printing why not."""
    import torch

    from framework.recipe.errors import print_errors

    try:
        return resolve_launch(num_processes, torch.cuda.device_count(), len(os.sched_getaffinity(0)), os.environ)
    except ValueError as err:
        print_errors([str(err)])
        return None


def exec_launch(entry: str, argv: list[str], launch: tuple[int, dict]) -> int:
    """Become `accelerate launch ... framework/entry/<entry> ARGV` (exec: signals reach the launcher directly)."""
    n, env = launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
           "--num_processes", str(n), "--main_process_port", str(_free_port()), str(PACKAGE / "entry" / entry), *argv]
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)
    return 0  # not reached
