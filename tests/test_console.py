"""The console's filters (framework/reporting/console.py) stop only the lines they name, and `verbose` none.
The launches in test_train_e2e.py and test_deepspeed.py check whole runs' consoles."""

from __future__ import annotations

import io
import logging
import os
import warnings

import torch
from conftest import free_port

from framework.reporting.console import LOGGER_LINES, _DropPrints, _DropText, quiet_libraries
from framework.training.builders import _ddp_kwargs


def test_ddp_gets_the_replacement_keyword_and_no_futurewarning(monkeypatch):
    import torch.distributed as dist

    assert _ddp_kwargs(False).to_kwargs() == {"forward_sync_buffers": False}
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the old keyword's FutureWarning would raise here
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.BatchNorm1d(3), **_ddp_kwargs(False).to_kwargs())
        assert model.forward_sync_buffers is False  # no broadcast before each forward, as broadcast_buffers=False was
    finally:
        dist.destroy_process_group()


def test_filters_drop_only_their_lines():
    record = lambda text: logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, text, None, None)  # noqa: E731
    drop = _DropText(LOGGER_LINES["DeepSpeed"])
    assert not drop.filter(record("**** You are using ZeRO with an untested optimizer, proceed with caution *****"))
    assert drop.filter(record("You are using ZeRO-Offload with a client provided optimizer"))
    out = io.StringIO()
    stream = _DropPrints(out, ("built successfully",))
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=stream)
    print("epoch   1 | loss 1.0", file=stream)
    assert out.getvalue() == "epoch   1 | loss 1.0\n"


def test_verbose_leaves_every_library_line(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    logger = logging.getLogger("torch.utils.cpp_extension")
    before = list(logger.filters)
    quiet_libraries(verbose=True, cuda=False)
    assert "DS_ACCELERATOR" not in os.environ and logger.filters == before
    try:
        quiet_libraries(verbose=False, cuda=False)
        assert os.environ["DS_ACCELERATOR"] == "cpu" and any(isinstance(f, _DropText) for f in logger.filters)
    finally:
        for f in [f for f in logger.filters if isinstance(f, _DropText)]:
            logger.removeFilter(f)
