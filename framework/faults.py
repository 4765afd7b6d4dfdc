"""Per-step agreement across processes: stop requests (SIGTERM) and non-finite loss or gradients.

One small all-reduce per step carries both flags, so every process acts at the same step: a
stop is honoured after the step completes (a checkpoint then captures a consistent state), and
a non-finite step is refused before the optimizer touches the weights, with the BN statistics
its forward updated put back, so weights, averaged weights, BN statistics and checkpoints never
take non-finite values.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    pass


class StepControl:
    def __init__(self, policy: str, max_consecutive_skips: int, device: torch.device):
        self.policy, self.max_skips, self.device = policy, max_consecutive_skips, device
        self.stop_requested = False  # set by the signal handler on this process
        self.stop_agreed = False  # set when any process asked: all see it at the same step
        self.consecutive_skips = 0
        self.skipped = 0

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)

    def check(self, loss: torch.Tensor, params, step: int, buffers: list[torch.Tensor] = (), grads: bool = True) -> bool:
        """After backward (gradients unscaled), before the optimizer step. True: take the step; False: skip it.
        `buffers`: BN running statistics the forward just updated (they can overflow while the loss stays finite).
        `grads=False`: the loss scaler already owns this step's overflowed gradients; the loss and BN are still checked."""
        watched = ([p.grad for p in params if p.grad is not None] if grads else []) + list(buffers)
        finite = torch.isfinite(loss.detach()).all()
        if watched:
            finite = finite & torch.stack(torch._foreach_norm(watched)).isfinite().all()
        flags = torch.stack([(~finite).float(), torch.tensor(float(self.stop_requested), device=loss.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop = flags.tolist()
        self.stop_agreed = self.stop_agreed or stop > 0
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
