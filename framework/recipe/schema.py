"""Typed recipe sections and a strict converter from plain YAML data to them.

Each section is a dataclass; a field's metadata may carry `ge`/`gt`/`le` bounds,
`choices` and a `doc`. `convert_section` turns a mapping into the dataclass and
collects one self-contained line per problem, each naming the dotted key.
Later sections (averaging, bn) are added by writing a dataclass and listing it in `Recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from framework.averaging import AVERAGERS
from framework.bn import BN_MODES
from framework.bn.inputs import RECOMPUTE_INPUTS
from framework.bn.sources import BN_SOURCES
from framework.recipe.errors import show
from framework.recipe.fields import spec


@dataclass(kw_only=True)
class ModelConfig:
    name: str = spec(doc="any timm model name")
    num_classes: int = spec(ge=1)
    in_chans: int = spec(3, ge=1)
    drop_rate: float = spec(0.0, ge=0.0, le=1.0)
    drop_path_rate: float = spec(0.0, ge=0.0, le=1.0)
    pretrained: bool = spec(False, doc="timm's weights for the model, from the local Hugging Face cache only")
    pretrained_file: str | None = spec(None, doc="local weights file; tensors whose shape fits are kept")
    kwargs: dict[str, Any] = spec(factory=dict, doc="further keywords of timm.create_model (drop_block_rate, ...)")
    bn_momentum: float | None = spec(None, gt=0.0, le=1.0, doc="sets every BN layer's momentum")
    bn_eps: float | None = spec(None, gt=0.0, doc="sets every BN layer's eps")
    channels_last: bool = spec(False, doc="NHWC weights and inputs")
    grad_checkpointing: bool = spec(False, doc="timm's set_grad_checkpointing; BN statistics still move once per step")
    compile: bool = spec(False, doc="torch.compile the model in place, after the BN conversion")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = spec("default")


@dataclass(kw_only=True)
class AugmentConfig:
    scale: list[float] = spec(factory=lambda: [0.08, 1.0], doc="RandomResizedCrop scale range")
    ratio: list[float] = spec(factory=lambda: [0.75, 1.3333333])
    hflip: float = spec(0.5, ge=0.0, le=1.0)
    vflip: float = spec(0.0, ge=0.0, le=1.0)
    color_jitter: float = spec(0.0, ge=0.0)
    auto_augment: str | None = spec(None, doc="timm's policy string: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, ...")
    re_prob: float = spec(0.0, ge=0.0, le=1.0, doc="random erasing probability")
    re_mode: Literal["const", "rand", "pixel"] = spec("pixel")
    re_count: int = spec(1, ge=1)


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["digits", "fashion_mnist", "folder", "timm", "synthetic"] = spec("digits")
    root: str | None = spec(None, doc="folder with <split>/ class folders or <split>.tar files (folder); cache dir "
                                      "(digits); the four IDX files (fashion_mnist; default: Debian's dataset-fashion-mnist); "
                                      "the dataset's local files (timm)")
    dataset: str | None = spec(None, doc="timm: a timm.data.create_dataset name with local files (torch/cifar10, "
                                         "torch/fashion_mnist, ...); framework/data/timm_datasets.py says which hold")
    train_subset: int | None = spec(None, ge=1, doc="train on a fixed subset of N images (the same in every run and seed)")
    train_split: str = spec("train")
    val_split: str = spec("val")
    image_size: int = spec(32, ge=8)
    batch_size: int = spec(64, ge=1, doc="per process")
    eval_batch_size: int = spec(256, ge=1, doc="per process")
    workers: int | Literal["auto"] = spec("auto", ge=0, doc="loader worker processes per training process; auto: "
                                          "the cores per process left after its compute threads, at most 8 (framework/data/loaders.py)")
    prefetch_factor: int = spec(2, ge=1, doc="batches each worker loads ahead (with workers > 0)")
    prefetcher: bool = spec(True, doc="with CUDA, timm's prefetcher: uint8 batches in pinned memory, normalised and "
                                      "randomly erased on the device (framework/data/device.py); no effect on CPU")
    synthetic_train_size: int = spec(2048, ge=1)
    synthetic_val_size: int = spec(512, ge=1)
    class_map: str | None = spec(None, doc="folder: file of class names, one per line (default: the training split's folders)")
    mean: list[float] | None = spec(None, doc="defaults to the model's pretrained config")
    std: list[float] | None = spec(None)
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = spec(
        None, doc="resize interpolation; with pretrained weights defaults to their config, else bilinear")
    crop_pct: float | None = spec(None, gt=0.0, le=1.0, doc="eval center crop; with pretrained weights defaults to their config, else 1")
    augment: AugmentConfig = spec(factory=AugmentConfig)


@dataclass(kw_only=True)
class MixupConfig:
    mixup_alpha: float = spec(0.0, ge=0.0, doc="timm.data.Mixup; 0 with cutmix_alpha 0: off")
    cutmix_alpha: float = spec(0.0, ge=0.0)
    cutmix_minmax: list[float] | None = spec(None, doc="CutMix box ratio range; overrides cutmix_alpha")
    prob: float = spec(1.0, ge=0.0, le=1.0, doc="probability of mixing a batch (or element)")
    switch_prob: float = spec(0.5, ge=0.0, le=1.0, doc="probability of CutMix instead of Mixup when both are on")
    mode: Literal["batch", "pair", "elem"] = spec("batch")
    off_epoch: int | None = spec(None, ge=0, doc="no mixing from this epoch on (0-based, as timm's --mixup-off-epoch)")

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None


@dataclass(kw_only=True)
class LossConfig:
    name: Literal["ce", "soft_ce", "bce"] = spec("ce", doc="training loss; evaluation is plain cross-entropy on hard labels")
    smoothing: float = spec(0.0, ge=0.0, lt=1.0, doc="label smoothing (given to Mixup when it is on)")
    bce_target_thresh: float | None = spec(None, gt=0.0, le=1.0, doc="bce: targets above it become 1")


@dataclass(kw_only=True)
class OptimizerConfig:
    name: str = spec("sgd", doc="any timm optimizer (timm.optim.list_optimizers())")
    lr: float | None = spec(0.1, gt=0.0, doc="null: timm's rule, lr_base x (global batch / lr_base_size)")
    lr_base: float = spec(0.1, gt=0.0)
    lr_base_size: int = spec(256, ge=1)
    lr_base_scale: Literal["linear", "sqrt"] | None = spec(None, doc="null: sqrt for Adam- and LAMB-like optimizers, else linear")
    weight_decay: float = spec(0.0, ge=0.0)
    momentum: float = spec(0.9, ge=0.0, le=1.0)
    betas: list[float] | None = spec(None, doc="Adam-like optimizers")
    eps: float | None = spec(None, gt=0.0)
    kwargs: dict[str, Any] = spec(factory=dict, doc="further keywords of the timm optimizer")
    layer_decay: float | None = spec(None, gt=0.0, le=1.0, doc="layer-wise learning-rate decay (timm's group_matcher)")
    clip_grad: float | None = spec(None, gt=0.0, doc="the clip threshold (norm, value) or factor (agc); null: no clipping")
    clip_mode: Literal["norm", "value", "agc"] = spec("norm", doc="timm's dispatch_clip_grad; agc leaves the classifier out, "
                                                              "as timm's train.py does")
    accumulate_steps: int = spec(1, ge=1, doc="batches per optimizer update (timm's --grad-accum-steps)")


@dataclass(kw_only=True)
class ScheduleConfig:
    name: str = spec("cosine", doc="any timm scheduler (cosine, step, multistep, plateau, poly, tanh)")
    epochs: int = spec(10, ge=1)
    warmup_epochs: int = spec(0, ge=0)
    warmup_lr: float = spec(1.0e-5, ge=0.0)
    min_lr: float = spec(0.0, ge=0.0)
    decay_epochs: float = spec(30.0, gt=0.0, doc="step: decay every this many epochs")
    decay_milestones: list[int] | None = spec(None, doc="multistep: epochs at which to decay (required there)")
    decay_rate: float = spec(0.1, gt=0.0, doc="step, multistep, plateau: factor per decay")
    plateau_metric: Literal["eval/online/top1", "eval/online/loss", "train/loss"] = spec(
        "eval/online/top1", doc="plateau: the per-epoch metric it watches (top1 up, losses down)")
    patience_epochs: int = spec(10, ge=0, doc="plateau: epochs without improvement before a decay")


def _averaging_config():
    """Common keys plus one options section per registered strategy (`averaging.swa.lr`, `averaging.ema.decay`)."""
    common = [
        ("name", str | None, spec(None, doc="the averager's name in outputs when `averaging` is a list (default: its strategy)")),
        ("strategy", Literal[("none", *AVERAGERS)], spec("none")),
        ("start", float, spec(0.75, ge=0.0, lt=1.0, doc="fraction of training steps before averaging starts")),
        ("start_epoch", int | None, spec(None, ge=0, doc="overrides start: begin after this many epochs")),
        ("every_steps", int, spec(1, ge=1)),
        ("offload", bool, spec(False, doc="keep the fp32 averaged copy in CPU memory")),
    ]
    per_strategy = [(name, cls.Options, spec(factory=cls.Options)) for name, cls in AVERAGERS.items()]
    return dataclasses.make_dataclass("AveragingConfig", common + per_strategy, kw_only=True)


AveragingConfig = _averaging_config()


def averagers_of(averaging) -> list:
    """The averagers a recipe runs: its one `averaging` section (none with strategy 'none'), or each
    entry of its list. Outputs keep today's single-averager names when there is one section."""
    entries = averaging if isinstance(averaging, list) else [averaging]
    return [a for a in entries if a.strategy != "none"]


def averager_name(cfg) -> str:
    return cfg.name or cfg.strategy


@dataclass(kw_only=True)
class BNConfig:
    mode: Literal[tuple(BN_MODES)] = spec("local", doc="local | sync | reduce (see framework/bn/__init__.py)")
    recompute_batches: int | None = spec(200, ge=1, doc="batches per process for the recompute pass (fvcore's PreciseBN "
                                                        "default; measured against the full pass in docs/RESULTS.md); null: all")
    recompute_inputs: Literal[RECOMPUTE_INPUTS] = spec("train", doc="what the recompute pass sees: train (train "
                                                       "transform), mixed (and Mixup), eval (eval transform)")
    export_stats: Literal[tuple(BN_SOURCES)] = spec("recompute", doc="BN statistics of model_averaged.safetensors")


@dataclass(kw_only=True)
class EvalConfig:
    every_epochs: int = spec(1, ge=1, doc="evaluate after every N epochs, and always after the last")
    bn_sources: list[Literal[tuple(BN_SOURCES)]] | None = spec(
        factory=list, doc="BN sources the averaged weights are also evaluated under after each epoch (default none: "
                          "each costs a recompute pass or an evaluation per averager); every source after the last "
                          "epoch. null: every source every epoch")


@dataclass(kw_only=True)
class LossScaleConfig:
    init: float = spec(2.0**16, ge=1.0, doc="fp16: the loss scale to start from (a power of two)")
    growth_interval: int = spec(2000, ge=1, doc="fp16: clean steps before the scale doubles")


@dataclass(kw_only=True)
class BackendConfig:
    type: Literal["ddp", "deepspeed", "fsdp"] = spec("ddp", doc="fsdp: torch's FSDP2 (fully_shard per timm block)")
    zero_stage: int = spec(0, ge=0, le=3, doc="DeepSpeed ZeRO stage: framework/configs/deepspeed/zero<stage>.json")
    offload_optimizer: bool = spec(False, doc="DeepSpeed, stages 1-3: optimizer state and fp32 master weights on CPU")
    offload_params: bool = spec(False, doc="DeepSpeed stage 3, or FSDP2: parameters on CPU (FSDP2: with their "
                                           "gradients and optimizer state, the step on CPU)")
    reshard_after_forward: bool = spec(True, doc="FSDP2: free each block's gathered parameters after its forward "
                                                 "(gathered again for backward): less memory, one more all-gather")
    precision: Literal["fp32", "bf16", "fp16"] = spec("fp32", doc="DeepSpeed on CPU runs fp32 and says so")
    slow_precision: Literal["warn", "refuse"] = spec("warn", doc="16-bit timed against fp32 before the first epoch "
                                                      "(one image): warn, or refuse to run, where it is 3x slower or more")
    loss_scale: LossScaleConfig = spec(factory=LossScaleConfig, doc="fp16's dynamic loss scaler")
    find_unused_parameters: bool = spec(False, doc="DDP only")


@dataclass(kw_only=True)
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = spec("auto", doc="auto: online with an API key, else offline")
    project: str = spec("bnswa")
    entity: str | None = spec(None)
    name: str | None = spec(None, doc="run name; defaults to the recipe's name")
    tags: list[str] = spec(factory=list)
    init_timeout: float = spec(90.0, gt=0.0, doc="seconds wandb.init may wait for the server; then auto falls back to offline")


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: WandbConfig = spec(factory=WandbConfig)
    progress: bool = spec(True, doc="progress bar on the main process (always off when CI=true)")
    verbose: bool = spec(False, doc="every library's warnings and log lines on the console too (bnswa train --verbose); "
                                    "by default a run prints the framework's lines only")
    interval_steps: int | None = spec(None, ge=1, doc="train loss, lr and images/s every N optimizer updates, to "
                                                      "metrics.jsonl, wandb and the progress bar; null: per epoch only")


@dataclass(kw_only=True)
class ExportConfig:
    best: str | None = spec(None, doc="a metric (eval/averaged/recompute/top1, eval/online/loss, ...): the best epoch's "
                                      "weights go to model_best.safetensors, with the BN statistics evaluated with them")


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = spec("runs/${name}", doc="where the run writes; ${name} is the recipe's name")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int | None = spec(None, ge=1, doc="checkpoint every N units; SIGTERM always checkpoints")
    unit: Literal["steps", "epochs"] = spec("epochs")
    keep: int = spec(2, ge=1, doc="complete checkpoints kept; older ones go once a newer one is complete")
    engine_copy: bool = spec(False, doc="DeepSpeed: also write the engine's own checkpoint (for zero_to_fp32.py); "
                                        "doubles the bytes, and resume never reads it")


@dataclass(kw_only=True)
class FaultsConfig:
    nonfinite: Literal["raise", "skip"] = spec("raise", doc="what a non-finite loss or gradient does")
    max_consecutive_skips: int = spec(5, ge=0)
    collective_timeout_s: int = spec(300, ge=10, doc="a dead or hung peer stops the others after this long")


@dataclass(kw_only=True)
class Recipe:
    name: str = spec(doc="defaults to the recipe file's name")
    seed: int = spec(0, ge=0)
    model: ModelConfig = spec()
    data: DataConfig = spec(factory=DataConfig)
    mixup: MixupConfig = spec(factory=MixupConfig)
    loss: LossConfig = spec(factory=LossConfig)
    optimizer: OptimizerConfig = spec(factory=OptimizerConfig)
    schedule: ScheduleConfig = spec(factory=ScheduleConfig)
    averaging: AveragingConfig | list[AveragingConfig] = spec(
        factory=AveragingConfig, doc="one averager, or a list of them evaluated side by side (each with a name)")
    bn: BNConfig = spec(factory=BNConfig)
    eval: EvalConfig = spec(factory=EvalConfig)
    backend: BackendConfig = spec(factory=BackendConfig)
    logging: LoggingConfig = spec(factory=LoggingConfig)
    output: OutputConfig = spec(factory=OutputConfig)
    export: ExportConfig = spec(factory=ExportConfig)
    checkpoint: CheckpointConfig = spec(factory=CheckpointConfig)
    faults: FaultsConfig = spec(factory=FaultsConfig)
    resume: str = spec("auto", doc="auto (newest complete checkpoint in output.dir), never, or a checkpoint folder")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}[tp]


def _convert(value: Any, tp, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key} = {value!r}: expected a mapping (section {tp.__name__})")
            return None
        return convert_section(tp, value, errors, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        section = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        if section is not None:  # a section, or a list of them: the value's shape picks
            return _convert(value, section if not isinstance(value, list) else next(
                a for a in inner if typing.get_origin(a) is list), key, errors)
        for option in inner:  # the first type the value fits (`int | Literal["auto"]`)
            sub: list[str] = []
            out = _convert(value, option, key, sub)
            if not sub:
                return out
        errors.append(f"{key} = {value!r}: expected {_type_name(tp)}")
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            errors.append(f"{key} = {value!r}: choices are {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errors.append(f"{key} = {value!r}: expected a mapping of names to values")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key} = {value!r}: expected {_type_name(tp)}")
            return value
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]", errors) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        errors.append(f"{key} = {value!r}: expected {_type_name(tp)}")
        return value
    return float(value) if tp is float else value


def _check_bounds(value: Any, meta, key: str, errors: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if value != value:  # NaN passes every comparison below
        errors.append(f"{key} = {value!r}: must be a finite number")
    for bound, ok, words in (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"), ("le", lambda b: value <= b, "<="),
                              ("lt", lambda b: value < b, "<")):
        b = meta.get(bound)
        if b is not None and not ok(b):
            errors.append(f"{key} = {value!r}: must be {words} {b}")


def suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def convert_section(cls, data: dict, errors: list[str], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(
                f"{prefix}{show(key)}: unknown key{suggest(str(key), fields)} (valid keys in "
                f"{prefix.rstrip('.') or 'the recipe'}: {', '.join(fields)})"
            )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            value = _convert(data[name], hints[name], key, errors)
            _check_bounds(value, f.metadata, key, errors)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{key}: required key is missing ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except TypeError:  # a required key was missing; already reported
        return None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _section(tp):
    """The section class of a field (`AveragingConfig | list[AveragingConfig]` is a section too), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def field_paths(cls, prefix: str = "") -> list[str]:
    """Every valid dotted key, for override suggestions."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if _section(hints[f.name]) is not None:
            out.extend(field_paths(_section(hints[f.name]), prefix + f.name + "."))
    return out


def open_mappings(cls, prefix: str = "") -> list[str]:
    """Dotted keys of free-form mappings (`model.kwargs`): any key below them may be overridden."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is dict:
            out.append(prefix + f.name)
        elif _section(hints[f.name]) is not None:
            out.extend(open_mappings(_section(hints[f.name]), prefix + f.name + "."))
    return out
