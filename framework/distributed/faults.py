"""Per-step agreement across processes: stop requests (SIGTERM), non-finite values, loss-scaler overflows.

One small all-reduce per step carries the flags, so every process acts at the same step: a stop
is honoured after a step completes (a checkpoint then captures a consistent state); a non-finite
loss, gradient or BN statistic stops the run (`raise`) or is refused (`skip`, with the BN
statistics its forward updated put back); an fp16 overflow is the loss scaler's (not judged).

Reading the flags on the host stalls a GPU (the CPU waits for backward before it may queue the
optimizer step). A step that may be refused (`skip`, or a loss scaler's verdict) must wait, as
GradScaler.step does. Under `raise` without a scaler nothing is refused, so the flags of step t
are read at step t+1 (`deferred`), when the GPU has long computed them: a non-finite step is then
applied to the live weights in memory, and the run raises before any checkpoint, evaluation or
export (`resolve` runs first in each), so none of them ever holds a non-finite value.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from framework.distributed.fsdp import local


class NonFiniteError(RuntimeError):
    pass


class StepControl:
    def __init__(self, policy: str, max_consecutive_skips: int, device: torch.device, deferred: bool = False):
        self.policy, self.max_skips, self.device = policy, max_consecutive_skips, device
        self.deferred = deferred and policy == "raise"
        self.stop_requested = False  # set by the signal handler on this process
        self.stop_agreed = False  # set when any process asked: all see it at the same step
        self.consecutive_skips = 0
        self.skipped = 0
        self.overflow = False  # the last step was the loss scaler's overflow (not taken, not judged)
        self._stop: torch.Tensor | None = None  # on the device: no host-to-device copy (a stall on CUDA) per step
        self._pending = None  # deferred: (host flags, event, step) of the last step

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)

    def check(self, loss: torch.Tensor, params, step: int, buffers: list[torch.Tensor] = (),
              overflow: torch.Tensor | None = None) -> bool:
        """After backward (gradients unscaled), before the optimizer step. True: take the step; False: skip it.
        `buffers`: BN running statistics the forward just updated (they can overflow while the loss stays finite).
        `overflow`: the loss scaler's verdict, on the device; such a step is the scaler's (`self.overflow`), its
        gradients are not judged, the loss and BN still are."""
        flags = self._flags(loss, params, buffers, overflow)
        if self.deferred and overflow is None:
            self.resolve()  # the previous step's flags, computed long ago
            host = flags.to("cpu", non_blocking=True) if flags.is_cuda else flags
            event = torch.cuda.Event() if flags.is_cuda else None
            if event is not None:
                event.record()
            self._pending = (host, event, step)
            return True
        return self._judge(flags.tolist(), step)

    def resolve(self) -> None:
        """Act on the deferred flags now (before a checkpoint, an evaluation, an export, the end)."""
        if self._pending is not None:
            host, event, step = self._pending
            self._pending = None
            if event is not None:
                event.synchronize()
            self._judge(host.tolist(), step)

    def _flags(self, loss, params, buffers, overflow) -> torch.Tensor:
        finite = torch.isfinite(loss.detach()).all()
        if buffers:
            finite = finite & torch.stack(torch._foreach_norm(list(buffers))).isfinite().all()
        # FSDP2: this process's gradient shards (the flags are reduced across processes below)
        grads = [local(p.grad) for p in params if p.grad is not None]
        if grads:
            grads_finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
            finite = finite & (grads_finite if overflow is None else grads_finite | overflow)
        if self._stop is None:
            self._stop = torch.zeros((), device=loss.device)
        if self.stop_requested:
            self._stop.fill_(1.0)
        over = overflow.float() if overflow is not None else torch.zeros_like(self._stop)
        flags = torch.stack([(~finite).float(), self._stop, over])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def _judge(self, values: list[float], step: int) -> bool:
        bad, stop, over = values
        self.stop_agreed = self.stop_agreed or stop > 0
        self.overflow = bool(over) and not bad
        if self.overflow:
            return False
        if not bad:
            self.consecutive_skips = 0
            return True
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.policy == "raise":
            raise NonFiniteError(f"non-finite loss, gradients or BN statistics at step {step} (seen from rank {rank}); "
                                 "faults.nonfinite = 'skip' skips such steps instead")
        self.consecutive_skips += 1
        self.skipped += 1
        if self.consecutive_skips > self.max_skips:
            raise NonFiniteError(f"{self.consecutive_skips} consecutive non-finite steps at step {step}: more than "
                                 f"faults.max_consecutive_skips = {self.max_skips}")
        return False
