"""Naming the process that died or hung when a collective fails.

gloo and NCCL only say that a collective failed, not which peer went away. Each process bumps
a counter in the rendezvous store from a daemon thread (its own store connection, so it never
waits behind the process group). A survivor reads every counter twice, a few intervals apart:
the ranks whose counter stood still are the ones that died or were stopped. Counters, not
clocks, so clock skew between machines does not matter. Under torchrun the store is hosted by
the launcher's agent and outlives any worker.
"""

from __future__ import annotations

import atexit
import threading
import time
from datetime import timedelta

INTERVAL_S = 0.5
_active: Heartbeat | None = None  # the one per process, for the entry point's error handler


class Heartbeat:
    def __init__(self, host: str, port: int, prefix: str, rank: int, world_size: int):
        import torch.distributed as dist

        self.rank, self.world_size, self.prefix = rank, world_size, prefix
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/heartbeat/{rank}"

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.beats += 1
            try:
                self.store.set(self._key(self.rank), str(self.beats))
            except Exception:  # the store went away: nothing left to tell
                return

    def start(self) -> Heartbeat:
        global _active
        self.store.set(self._key(self.rank), "0")
        self._thread.start()
        # A daemon thread still inside a store call when the interpreter finalizes is killed by
        # forced unwinding through C++, which aborts the process ("terminate called without an
        # active exception") after a successful run. Stop it first.
        atexit.register(self.stop)
        _active = self
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)  # longer than one store call can block (10 s timeout)

    def _read(self) -> dict[int, int]:
        others = [r for r in range(self.world_size) if r != self.rank]
        return {r: int(self.store.get(self._key(r))) for r in others}

    def silent_ranks(self, wait_s: float = 4 * INTERVAL_S) -> list[int] | None:
        """Ranks whose heartbeat stopped; None if the store cannot be read."""
        try:
            before = self._read()
            time.sleep(wait_s)
            after = self._read()
        except Exception:
            return None
        return [r for r in before if after[r] == before[r]]


def describe_silent_ranks() -> str:
    """For an error message: which processes stopped beating, as far as this one can tell."""
    silent = _active.silent_ranks() if _active is not None else None
    if silent is None:
        return "could not tell which process (no heartbeat store)"
    if not silent:
        return "every other process is still alive (a collective mismatch or a hang inside one)"
    return ", ".join(f"rank {r}" for r in silent) + " stopped responding (died or hung)"
