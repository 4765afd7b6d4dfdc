"""Entry point: `accelerate launch --config_file accelerate_config.yaml launch/train.py RECIPE [overrides]`
(launch/train.py runs this file's `main`; `bnswa train` launches this file itself).

Every process validates the recipe before any process group starts; a bad recipe exits 2
with one line per problem and writes nothing.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from framework.recipe.cli import load_or_exit

    # WORLD_SIZE: set by the launcher (torch elastic) for every process it starts
    recipe = load_or_exit(argv, quiet_rank=os.environ.get("LOCAL_RANK", "0") != "0",
                          world_size=int(os.environ.get("WORLD_SIZE", "1")))

    from framework.distributed.output_lock import OutputBusy, OutputLock
    from framework.distributed.watchdog import watch_launcher
    from framework.recipe.errors import print_errors

    lock = None
    if os.environ.get("RANK", "0") == "0":  # before any process group: the others are stopped by the launcher
        try:
            lock = OutputLock(recipe.output.dir).acquire()
        except OutputBusy as err:
            print_errors([str(err)])
            return 2
    watch_launcher()
    try:
        return _run(recipe)
    finally:
        if lock is not None:
            lock.release()


def _run(recipe) -> int:
    import torch.distributed as dist

    from framework.checkpoint.store import CheckpointWriteError
    from framework.distributed.faults import NonFiniteError
    from framework.recipe.errors import print_errors
    from framework.reporting.tracking import LoggerStartError
    from framework.training.loop import Interrupted, train
    from framework.training.precision_probe import SlowPrecision

    try:
        summary = train(recipe)
    except Interrupted as stop:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"interrupted: {stop.message}", flush=True)
        _shutdown(dist)
        return 143
    except NonFiniteError as err:
        print_errors([str(err)])
        _shutdown(dist)
        return 1
    except CheckpointWriteError as err:  # every process raises it; the main process names the intact checkpoint
        if os.environ.get("RANK", "0") == "0":
            print_errors([str(err)])
        _shutdown(dist)
        return 1
    except (LoggerStartError, SlowPrecision) as err:  # every process raises it; one line is enough
        if os.environ.get("RANK", "0") == "0":
            print_errors([str(err)])
        _shutdown(dist)
        return 2
    except RuntimeError as err:  # a peer died (noticed at once) or hung (noticed at the timeout)
        if not _lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        from framework.distributed.heartbeat import describe_silent_ranks

        print_errors([f"rank {os.environ.get('RANK', '0')}: lost contact with another process during a collective: "
                      f"{describe_silent_ranks()} (a process that died, or hung past faults.collective_timeout_s = "
                      f"{recipe.faults.collective_timeout_s} s): {first}"])
        return 1
    if summary.get("output_dir"):  # main process only
        print("final: " + json.dumps({"online": summary["eval"]["online"], "throughput": summary["throughput"]}))
        print(f"run files: {summary['output_dir']}" + (f"  (wandb: {summary['wandb']['dir']})" if summary["wandb"]["dir"] else ""))
    _shutdown(dist)
    return 0


def _lost_peer(err: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(s in text for s in ("gloo", "nccl", "connection", "timed out",
                                                                       "timeout", "pair closure"))


def _shutdown(dist) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo can abort at exit without it


if __name__ == "__main__":  # run as a file by the launcher: the package holding it comes first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(sys.argv[1:]))
