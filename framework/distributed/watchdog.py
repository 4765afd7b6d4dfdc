"""Workers stop when their launcher dies.

torch elastic starts each worker in a session of its own, so a SIGKILL to the launcher (an OOM
kill, a scheduler, a user) leaves the workers training on as orphans, beside whatever is launched
next in the same output folder. A daemon thread notices the parent change within a second and
asks for the same stop as SIGTERM (every process agrees at the next step and checkpoints); a
process still alive `grace_s` later (stuck in a collective whose peer is gone) exits at once.
"""

from __future__ import annotations

import os
import signal
import threading

POLL_S = 1.0


def _watch(parent: int, rank: str, grace_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            break
    print(f"rank {rank}: the launcher (process {parent}) is gone; stopping at the next step with a checkpoint "
          "(relaunch with resume=auto)", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    stop.wait(grace_s)
    print(f"rank {rank}: still running {grace_s:.0f} s after the launcher died; exiting now", flush=True)
    os._exit(1)


def watch_launcher(grace_s: float = 20.0) -> None:
    """Under torch elastic only (its agent is this process's parent); a no-op otherwise."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    rank = os.environ.get("RANK", "0")
    threading.Thread(target=_watch, args=(os.getppid(), rank, grace_s), name="launcher-watchdog", daemon=True).start()
