"""The heartbeat thread must never turn a finished run into a crash at interpreter exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Beats continuously, so the thread is almost always inside a store call when the process
# exits. Without a stop at exit, C++ unwinding of the killed daemon thread aborted 10/10 runs.
SCRIPT = """
import time
import torch.distributed as dist
import framework.distributed.heartbeat as heartbeat
heartbeat.INTERVAL_S = 0.0
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
beat = heartbeat.Heartbeat("127.0.0.1", store.port, "test", 0, 1).start()
time.sleep(0.2)
assert beat.beats > 0, "the heartbeat never beat"
"""


def test_process_with_a_running_heartbeat_exits_cleanly():
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
        assert "terminate called" not in proc.stderr
