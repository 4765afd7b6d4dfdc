"""One live run per output folder: an advisory lock on `<output.dir>/.lock`.

The main process of a launch takes an exclusive `flock` on the file before any process group
starts and keeps it for its lifetime; the kernel drops it when that process dies however it dies,
so a lock left by a dead run is simply free (its holder line is replaced, with a note). The file
says who holds it (host, process id, since when) so a refused launch can name the holder.
`bnswa train` checks the same lock before it launches anything.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class OutputBusy(RuntimeError):
    pass


def _holder_line() -> str:
    return f"host {socket.gethostname()}, process {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


class OutputLock:
    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, announce: bool = True) -> OutputLock:
        """Take the lock or raise OutputBusy naming the live holder. `announce`: write this process as the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise OutputBusy(f"output.dir = {str(self.path.parent)!r}: in use by a live run ({holder}); wait for it, "
                             "stop it, or choose another output.dir") from None
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale and announce:
            print(f"note: output.dir {self.path.parent}: taking over the lock of a run that ended without releasing it "
                  f"({stale})", flush=True)
        if announce:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self, clear: bool = True) -> None:
        """`clear`: a clean end leaves no holder line (and so no takeover note next time)."""
        if self.fd is not None:
            if clear:
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def check_output_free(out: Path) -> None:
    """Raise OutputBusy if a live run holds `out`; takes and drops the lock, writes nothing."""
    if (Path(out) / LOCK_NAME).exists():
        OutputLock(out).acquire(announce=False).release(clear=False)
