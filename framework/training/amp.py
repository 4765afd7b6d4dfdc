"""Mixed precision for the training step: autocast, the fp16 loss scaler, and overflow counting.

Under DDP this module owns autocast and torch's GradScaler on CPU and GPU alike (Accelerate is
built with mixed_precision='no'): Accelerate ignores fp16 on CPU, and its scaler would hand the
non-finite check gradients that are still scaled. Here the gradients are unscaled first, so an
overflow (inf gradients at a finite loss, while the scale is above 1) is the scaler's business:
the step is skipped, the scale halves, the step is counted (`amp/overflow_steps` in each epoch's
record), and nothing else moves. Anything else non-finite goes to `faults.nonfinite`.

Under DeepSpeed the engine casts the model, scales the loss and steps inside `backward`; an
overflow is a step the engine did not apply (`was_step_applied()`), counted the same way.
Either way the verdict stays on the device until the per-step check reads it with its own flags
(one host read per step, as GradScaler.step itself makes).
"""

from __future__ import annotations

import contextlib
import math

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """DDP: torch.autocast + torch.amp.GradScaler (fp16 only)."""

    def __init__(self, precision: str, device: torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 sharded: bool = False):
        self.device, self.dtype = device, DTYPES[precision]
        # FSDP2: each process sees its gradient shards only; torch's ShardedGradScaler agrees on overflow across them
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as Scaler
        else:
            Scaler = torch.amp.GradScaler  # noqa: N806
        self.scaler = (Scaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
                       if precision == "fp16" else None)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, accelerator, loss: torch.Tensor, last: bool) -> None:
        """Backward on one batch's share of the update's loss; `last`: the update's last batch (DDP's
        gradient all-reduce is skipped on the others by `no_sync` around this call)."""
        accelerator.backward(self.scale(loss))

    def unscale(self, optimizer, loss: torch.Tensor) -> torch.Tensor | None:
        """After backward: unscale the gradients in place. On the device (no host sync), whether the
        step overflowed in the scaler's sense: to be skipped and counted, not judged by `faults.nonfinite`.
        None without a scaler."""
        if self.scaler is None:
            return None
        self.scaler.unscale_(optimizer)
        found = sum(self.scaler._found_inf_per_device(optimizer).values())
        # A non-finite loss, or gradients that overflow even unscaled (scale <= 1), are divergence.
        # (`_scale` is the scale on the device; get_scale() would read it back to the host.)
        # (ShardedGradScaler's flags have shape [1]: a scalar, as GradScaler's)
        return ((found > 0) & torch.isfinite(loss.detach()).all() & (self.scaler._scale > 1.0)).reshape(())

    def step(self, optimizer, apply: bool) -> None:
        """Apply the update (`apply`) or not; the scaler then updates its scale either way (on the device).
        The step is decided already: GradScaler.step would read its inf flags back to the host again."""
        if apply:
            optimizer.step()
        if self.scaler is not None:
            self.scaler.update()

    def overflowed(self, verdict: torch.Tensor | None) -> bool:
        """The scaler's verdict read on the host (when no per-step check reads it along with its own flags)."""
        return verdict is not None and bool(verdict)

    @property
    def can_overflow(self) -> bool:
        return self.scaler is not None

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])


class EnginePrecision(MixedPrecision):
    """DeepSpeed: the engine owns casting and scaling (its scaler's state is in the engine's checkpoint part)."""

    def __init__(self, precision: str, device: torch.device, engine):
        super().__init__("fp32", device)
        self.precision, self.engine = precision, engine

    @property
    def can_overflow(self) -> bool:
        return self.precision == "fp16"

    def backward(self, accelerator, loss: torch.Tensor, last: bool) -> None:
        """The engine reduces and steps on the update's last batch only. The loss is already divided by the
        update's batches (the epoch's last update may have fewer than gradient_accumulation_steps): the
        engine must not divide it again."""
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last, scale_wrt_gas=False)

    def unscale(self, optimizer, loss: torch.Tensor) -> torch.Tensor | None:
        """The engine stepped inside backward (and unscaled): whether it skipped that step for an overflow."""
        if self.precision != "fp16":
            return None
        return torch.tensor(not self.engine.was_step_applied(), device=self.device)


def deepspeed_fp16_config(init_scale: float, growth_interval: int) -> dict:
    """DeepSpeed's fp16 section for `backend.loss_scale` (it takes the scale as a power of two)."""
    return {"loss_scale": 0, "initial_scale_power": int(math.log2(init_scale)), "loss_scale_window": growth_interval}


def create_precision(precision: str, engine, device: torch.device, init_scale: float,
                     growth_interval: int, sharded: bool = False) -> MixedPrecision:
    """`engine`: the DeepSpeed engine (accelerator.prepare's model), or None under DDP and FSDP2 (`sharded`)."""
    if engine is not None:
        return EnginePrecision(precision, device, engine)
    return MixedPrecision(precision, device, init_scale, growth_interval, sharded)
