"""A run's console holds the framework's lines; `logging.verbose: true` (`bnswa train --verbose`) lets
every library line through again.

Decided per line, by its exact text, where it is emitted (never a process-wide warnings filter):
- torch's FutureWarning on `broadcast_buffers`, through Accelerate: ours to fix; DDP gets the replacement
  keyword `forward_sync_buffers` (framework/training/builders.py), with or without `verbose`.
- DeepSpeed's "Setting accelerator to CPU ... unable to detect it", at its import (Accelerate imports it
  in every run): the framework knows the device, and names it as DeepSpeed documents (DS_ACCELERATOR=cpu)
  on a machine without CUDA.
- torch's "No CUDA runtime is found, using CUDA_HOME" (its C++ extension loader, imported by DeepSpeed on
  CPU) and DeepSpeed's "untested optimizer" warning (timm's optimizers are not on DeepSpeed's list; the
  framework's tests train each under ZeRO): a filter on the logger that emits each, for that text only.
- DeepSpeed's "DeepSpeed ... built successfully" print when its engine starts on CPU: dropped from
  stdout while the engine starts (`dropping_prints`), every other line passing through.
- torch's "Grad strides do not match bucket view strides" UserWarning, raised in C++ from DDP's first
  backward (timm's CoAtNet under bf16 autocast gives a gradient a layout other than its parameter's):
  a note on the model's memory layout that no recipe key changes; ignored by its message only.
- torch's "Found a non-scalar tensor with numel=1" UserWarning under FSDP2 in fp16: torch's own
  ShardedGradScaler hands its one-element inf flag to the DTensor gradients' unscale op, which
  replicates it (the right result) and warns; ignored by its message only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings

LOGGER_LINES = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "DeepSpeed": ("You are using ZeRO with an untested optimizer",),
}
PRINTED_LINES = ("built successfully",)
WARNING_MESSAGES = ("Grad strides do not match bucket view strides", "Found a non-scalar tensor with numel=1")


class _DropText(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def quiet_libraries(verbose: bool, cuda: bool) -> None:
    """Before the libraries start (Accelerator, DeepSpeed): stop the lines above, unless `verbose`."""
    if verbose:
        return
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for text in WARNING_MESSAGES:  # a message filter, not a category: every other warning still shows
        warnings.filterwarnings("ignore", message=re.escape(text), category=UserWarning)
    for name, texts in LOGGER_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) for f in logger.filters):
            logger.addFilter(_DropText(texts))


class _DropPrints:
    """sys.stdout, minus the lines holding one of `texts` (print writes a line and its newline separately)."""

    def __init__(self, stream, texts: tuple[str, ...]):
        self.stream, self.texts, self.dropped = stream, texts, False

    def write(self, text: str) -> int:
        if any(t in text for t in self.texts):
            self.dropped = True
            return len(text)
        if self.dropped and text == "\n":
            self.dropped = False
            return 1
        self.dropped = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def dropping_prints(verbose: bool, texts: tuple[str, ...] = PRINTED_LINES):
    if verbose:
        yield
        return
    real = sys.stdout
    sys.stdout = _DropPrints(real, texts)
    try:
        yield
    finally:
        sys.stdout = real
