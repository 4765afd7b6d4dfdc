"""Builders: recipe sections to objects (accelerator, model, optimizer, scheduler)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch

from framework.distributed.heartbeat import Heartbeat
from framework.recipe.schema import BackendConfig, OptimizerConfig, ScheduleConfig

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(requested: str, cuda: bool, deepspeed: bool = False) -> tuple[str, str | None]:
    """Precision to run with and, when it differs from the request, why. Under DDP every precision runs on
    CPU too (torch's CPU autocast and GradScaler, framework/training/amp.py); DeepSpeed's engine casts the model,
    and CPU BatchNorm refuses mixed dtypes."""
    if requested != "fp32" and deepspeed and not cuda:
        return "fp32", f"backend.precision = {requested!r} under DeepSpeed needs a GPU; running in fp32 on CPU"
    return requested, None


# package data, so an installed package has them (the clone's launch/deepspeed links here)
DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def create_deepspeed_config(cfg: BackendConfig, micro_batch_size: int, clip_grad: float | None,
                            accumulate_steps: int = 1) -> dict:
    """framework/configs/deepspeed/zero<stage>.json with the values the recipe decides filled in."""
    from framework.training.amp import deepspeed_fp16_config

    config = json.loads((DEEPSPEED_CONFIGS / f"zero{cfg.zero_stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=accumulate_steps,
                  gradient_clipping=clip_grad or 0.0)
    config["fp16"].update(deepspeed_fp16_config(cfg.loss_scale.init, cfg.loss_scale.growth_interval))  # read when enabled
    zero = config["zero_optimization"]
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config["zero_force_ds_cpu_optimizer"] = False  # keep the recipe's timm optimizer
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return config


def _single_process_env() -> None:
    """DeepSpeed wants a rendezvous even for one process started without a launcher."""
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_process_group(cuda: bool, timeout_s: int) -> None:
    """Under torchrun, join the process group ourselves, with a key prefix per restart attempt: after an
    elastic restart (--max_restarts) a gloo group built on the agent's long-lived store otherwise often
    fails to reconnect (stale keys from the attempt before). Accelerate and DeepSpeed reuse the group."""
    import torch.distributed as dist

    env = os.environ
    if dist.is_initialized() or "TORCHELASTIC_RESTART_COUNT" not in env or int(env.get("WORLD_SIZE", "1")) < 2:
        return
    from datetime import timedelta

    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it on node 0
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=not agent_store and rank == 0,
                          timeout=timeout)
    if cuda:
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    prefix = f"bnswa-attempt-{env['TORCHELASTIC_RESTART_COUNT']}"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(prefix, store),
                            rank=rank, world_size=world, timeout=timeout)
    Heartbeat(env["MASTER_ADDR"], int(env["MASTER_PORT"]), prefix, rank, world).start()  # names a lost peer later


def _ddp_kwargs(find_unused_parameters: bool):
    """Accelerate's DDP keywords plus torch 2.13's `forward_sync_buffers=False`, which replaces the deprecated
    `broadcast_buffers=False` (a FutureWarning per process). Accelerate 1.15's handler has no field for it and
    takes only its own class in `kwargs_handlers`, so this subclass is set as the accelerator's `ddp_handler`,
    which `prepare` reads. Unlike the old keyword, buffers are still broadcast once when DDP wraps the model;
    they are equal on every rank then (one seed), and a resume loads each rank's own statistics after the
    wrap, so `local` BN keeps them."""
    from accelerate.utils import DistributedDataParallelKwargs

    @dataclasses.dataclass
    class DDPKwargs(DistributedDataParallelKwargs):
        forward_sync_buffers: bool | None = None

    return DDPKwargs(find_unused_parameters=find_unused_parameters, forward_sync_buffers=False)


def create_accelerator(cfg: BackendConfig, micro_batch_size: int, clip_grad: float | None, timeout_s: int = 300,
                       accumulate_steps: int = 1):
    """`timeout_s`: how long a collective waits for a dead or hung peer (torch's defaults: 30 min gloo)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision, note = resolve_precision(cfg.precision, cuda, cfg.type == "deepspeed")
    init_process_group(cuda, timeout_s)
    if cfg.type == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        _single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=create_deepspeed_config(cfg, micro_batch_size, clip_grad, accumulate_steps))
        # cpu=True would silently replace DeepSpeed with DDP; gloo is asked for explicitly instead
        handlers = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))]
        accelerator = Accelerator(deepspeed_plugin=plugin, mixed_precision=_PRECISION[precision], kwargs_handlers=handlers)
        if note and accelerator.is_main_process:
            print(f"note: {note}", flush=True)
        return accelerator, precision
    if cfg.type == "fsdp":  # the framework shards the model itself (framework/distributed/fsdp.py), on CPU and GPU
        from framework.distributed.fsdp import init_fsdp_group

        init_fsdp_group(cuda, timeout_s)
    # On a CPU machine a plain Accelerator under a multi-process launch tells every rank it is
    # rank 0 of 1; cpu=True gives MULTI_CPU over gloo with real ranks.
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    # Autocast and the loss scaler are framework/training/amp.py's, on CPU and GPU alike
    accelerator = Accelerator(cpu=not cuda, mixed_precision="no", kwargs_handlers=[pg])
    # No BN buffer broadcast before every forward: each bn.mode makes statistics identical
    # before evaluation instead (framework/bn/__init__.py), the same under DDP and DeepSpeed.
    accelerator.ddp_handler = _ddp_kwargs(cfg.find_unused_parameters)
    if note and accelerator.is_main_process:
        print(f"note: {note}", flush=True)
    return accelerator, precision


def create_grad_clipper(cfg: OptimizerConfig, deepspeed: bool):
    """`clip(model)` after the gradients are unscaled, or None: nothing to clip, or DeepSpeed's engine clips
    by norm itself (`gradient_clipping`; the other modes are refused at validation)."""
    if cfg.clip_grad is None or deepspeed:
        return None
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad

    def clip(model: torch.nn.Module) -> None:
        dispatch_clip_grad(model_parameters(model, exclude_head=cfg.clip_mode == "agc"), cfg.clip_grad, cfg.clip_mode)

    return clip


def optimizer_refusal(name: str, cuda: bool) -> str | None:
    """Why a timm optimizer cannot run in this loop or on this machine, or None."""
    import importlib.util

    name = name.lower()
    if name == "adahessian":
        return "second-order: it needs backward(create_graph=True), which this loop does not do (nor DeepSpeed)"
    for prefix, package, what in (("bnb", "bitsandbytes", "bitsandbytes"), ("fused", "apex", "NVIDIA apex")):
        if name.startswith(prefix) and (not cuda or importlib.util.find_spec(package) is None):
            return f"needs {what} installed and a GPU"
    if name.startswith("kron"):
        return "timm's PSGD-Kron tried to allocate about 11 GB for timm's test_resnet here; not supported"
    return None


def resolve_lr(cfg: OptimizerConfig, global_batch: int) -> float:
    """The recipe's lr, else timm's rule: lr_base scaled by global batch / lr_base_size, linearly, or by its
    square root (by default for Adam- and LAMB-like optimizers, as timm's train.py decides)."""
    if cfg.lr is not None:
        return cfg.lr
    name = cfg.name.lower()
    scale = cfg.lr_base_scale or ("sqrt" if any(n in name for n in ("ada", "lamb")) else "linear")
    ratio = global_batch / cfg.lr_base_size
    return cfg.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


def create_optimizer(cfg: OptimizerConfig, model, global_batch: int):
    from timm.optim import create_optimizer_v2

    extra = {**cfg.kwargs, **({"betas": tuple(cfg.betas)} if cfg.betas is not None else {}),
             **({"eps": cfg.eps} if cfg.eps is not None else {})}
    # timm passes momentum only to optimizers that take one; layer decay gives each group an lr_scale
    return create_optimizer_v2(model, opt=cfg.name, lr=resolve_lr(cfg, global_batch), weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, layer_decay=cfg.layer_decay, **extra)


def check_optimizer_keywords(cfg: OptimizerConfig, errors: list[str]) -> None:
    """Settings the optimizer does not take or refuses are named at validation (built for one tensor here)."""
    if cfg.betas is not None and (expected := _default_betas(cfg.name)) and len(cfg.betas) != len(expected):
        errors.append(f"optimizer.betas = {cfg.betas!r}: timm's {cfg.name!r} optimizer takes {len(expected)} betas "
                      f"(its default: {list(expected)})")
        return
    probe = torch.nn.Linear(2, 2)
    try:
        create_optimizer(dataclasses.replace(cfg, layer_decay=None), probe, 1)
    except TypeError as err:
        bad = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        key = bad.group(1) if bad else None
        where = f"optimizer.kwargs.{key}" if key in cfg.kwargs else f"optimizer.{key}" if key else "optimizer"
        value = cfg.kwargs.get(key, getattr(cfg, key, None)) if key else cfg.kwargs
        errors.append(f"{where} = {value!r}: not a keyword of timm's {cfg.name!r} optimizer ({err})")
    except (ValueError, AssertionError, IndexError, RuntimeError) as err:
        errors.append(f"optimizer.name = {cfg.name!r} with momentum {cfg.momentum}, betas {cfg.betas}, eps {cfg.eps}, kwargs "
                      f"{cfg.kwargs}: timm's optimizer refuses them ({err})"
                      + ("; for SGD without momentum use optimizer.name = 'momentum'" if "Nesterov" in str(err) else ""))


def _default_betas(name: str) -> tuple | None:
    """The betas an optimizer class takes by default (Adam-like 2, Adan 3), or None when it takes none."""
    import inspect

    import timm.optim

    opt_class = timm.optim.get_optimizer_info(name).opt_class
    try:
        default = inspect.signature(opt_class).parameters.get("betas")
    except (TypeError, ValueError):  # a class whose signature cannot be read: the probe decides
        return None
    return default.default if default is not None and isinstance(default.default, tuple) else None


def create_scheduler(cfg: ScheduleConfig, optimizer, updates_per_epoch: int):
    """A timm scheduler stepped per update (`step_update`) and per epoch (`step(epoch, metric)`).
    Plateau decides on a per-epoch metric, so it alone steps per epoch (timm asserts so)."""
    from timm.scheduler import create_scheduler_v2

    plateau = cfg.name == "plateau"
    with warnings.catch_warnings():  # timm's plateau warns that its state is not checkpointed: ours is (below)
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.name, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr, decay_epochs=cfg.decay_epochs, decay_milestones=cfg.decay_milestones or (),
            decay_rate=cfg.decay_rate, patience_epochs=cfg.patience_epochs,
            plateau_mode="max" if cfg.plateau_metric.endswith("top1") else "min",
            step_on_epochs=plateau, updates_per_epoch=updates_per_epoch,
        )
    return scheduler


def scheduler_state_dict(scheduler) -> dict:
    """timm's state, plus the counters its plateau scheduler leaves out (bad epochs, cooldown), so resume is exact."""
    state = scheduler.state_dict()
    inner = getattr(scheduler, "lr_scheduler", None)  # timm's PlateauLRScheduler wraps torch's ReduceLROnPlateau
    return {**state, "torch_plateau": inner.state_dict()} if inner is not None else state


def load_scheduler_state_dict(scheduler, state: dict, same_units: bool = True) -> None:
    """`same_units=False` (another world size, so other updates per epoch): timm's per-update schedulers
    are functions of the update count and their saved fields are in the old count's units, so this
    run's are kept; plateau's state is per epoch and always loaded."""
    state = dict(state)
    inner = state.pop("torch_plateau", None)
    if inner is None and not same_units:
        return
    scheduler.load_state_dict(state)
    if inner is not None:
        scheduler.lr_scheduler.load_state_dict(inner)
