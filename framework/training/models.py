"""timm models from a recipe: the build keywords, pretrained weights kept by shape, BN settings,
and the checks that run at validation on the meta device (no memory, no weights)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from framework.recipe.schema import ModelConfig

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def build_kwargs(cfg: ModelConfig) -> dict:
    return dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans, drop_rate=cfg.drop_rate,
                drop_path_rate=cfg.drop_path_rate, **cfg.kwargs)


def build_plain(cfg: ModelConfig, image_size: int | None):
    """The bare timm model, built for `image_size` where its constructor takes one (`img_size`)."""
    import timm

    kwargs = build_kwargs(cfg)
    if image_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(cfg.name, pretrained=False, img_size=image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(cfg.name, pretrained=False, **kwargs)


def set_bn(model: torch.nn.Module, momentum: float | None, eps: float | None) -> None:
    """Set every BN layer's momentum and eps where the recipe gives them."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                m.momentum = momentum
            if eps is not None:
                m.eps = eps


def hf_cached_weights(model) -> Path | None:
    """timm's weights for this model in the local Hugging Face cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    repo = (model.pretrained_cfg or {}).get("hf_hub_id")
    if not repo:
        return None
    for name in ((model.pretrained_cfg.get("hf_hub_filename"),) if model.pretrained_cfg.get("hf_hub_filename") else HF_WEIGHT_FILES):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def load_matching(model: torch.nn.Module, path: Path) -> list[str]:
    """Load every tensor of `path` whose name and shape fit the model (the classifier too, when its shape
    fits). Returns lines saying what was kept and what was dropped. Never unpickles (weights_only)."""
    from timm.models import load_state_dict

    state = load_state_dict(str(path), use_ema=False, weights_only=True)
    lines = []
    # timm's own conversion for the family (what its load_pretrained applies): resamples position
    # embeddings to the size the model was built for, converts original-format weights
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # a file in another layout: load it as it is, and say so
            lines.append(f"  {type(model).__module__}.checkpoint_filter_fn failed ({type(err).__name__}: {err}); loaded as is")
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    dropped = [f"{k} {tuple(v.shape)}" + (f" (model: {tuple(own[k].shape)})" if k in own else " (not in model)")
               for k, v in state.items() if k not in keep]
    untouched = [k for k in own if k not in keep]
    model.load_state_dict(keep, strict=False)
    lines.insert(0, f"pretrained weights {path}: kept {len(keep)} of {len(state)} tensors")
    if dropped:
        lines.append("  dropped (shape or name does not fit): " + ", ".join(dropped))
    if untouched:
        lines.append("  left as initialised: " + ", ".join(untouched))
    return lines


def create_model(cfg: ModelConfig, image_size: int | None) -> tuple[torch.nn.Module, list[str]]:
    """The model with its weights, and lines for the main process to print about the weights."""
    model = build_plain(cfg, image_size)
    set_bn(model, cfg.bn_momentum, cfg.bn_eps)
    weights = Path(cfg.pretrained_file) if cfg.pretrained_file else hf_cached_weights(model) if cfg.pretrained else None
    return model, load_matching(model, weights) if weights is not None else []


def _forward_fails(cfg: ModelConfig, size: int, model: torch.nn.Module | None = None) -> str | None:
    """Why a meta-device forward at `size` fails, or None. `model`: one already built on meta for `size`."""
    try:
        with torch.device("meta"):
            model = model if model is not None else build_plain(cfg, size)
            model.eval()(torch.empty(2, cfg.in_chans, size, size))
    except Exception as err:  # any failure is the model refusing the size
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
    return None


def check_model(cfg: ModelConfig, image_size: int, errors: list[str]) -> None:
    """Build on the meta device and run one forward at `image_size`: unknown keywords, sizes the model
    cannot take and pointless BN settings become errors naming the key."""
    try:
        with torch.device("meta"):
            model = build_plain(cfg, image_size)
    except TypeError as err:
        bad = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        if bad and bad.group(1) in cfg.kwargs:
            errors.append(f"model.kwargs.{bad.group(1)} = {cfg.kwargs[bad.group(1)]!r}: not a keyword of "
                          f"timm.create_model({cfg.name!r}) ({err})")
        else:
            errors.append(f"model.kwargs = {cfg.kwargs!r}: timm.create_model({cfg.name!r}) refused them: {err}")
        return
    except Exception as err:  # timm raises many kinds for a bad combination
        errors.append(f"model = {cfg.name!r} with {build_kwargs(cfg)!r}: timm.create_model failed: {err}")
        return
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(patch, int) and image_size % patch:
        errors.append(f"data.image_size = {image_size}: {cfg.name} needs a multiple of its patch size {patch} "
                      f"(e.g. {image_size - image_size % patch or patch} or {image_size - image_size % patch + patch})")
    elif (why := _forward_fails(cfg, image_size, model)) is not None:
        step = 16
        nearby = [s for s in range(max(step, (image_size // step - 2) * step), image_size + 3 * step, step)
                  if s != image_size and _forward_fails(cfg, s) is None][:4]
        errors.append(f"data.image_size = {image_size}: {cfg.name} cannot take it ({why})"
                      + (f"; sizes it takes nearby: {', '.join(map(str, nearby))}" if nearby else ""))
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (NotImplementedError, AssertionError, AttributeError) as err:
            errors.append(f"model.grad_checkpointing = True: {cfg.name} does not support it ({type(err).__name__}: {err})")
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for key in ("bn_momentum", "bn_eps"):
        if getattr(cfg, key) is not None and not has_bn:
            errors.append(f"model.{key} = {getattr(cfg, key)!r}: {cfg.name} has no BatchNorm layer to set")
    if cfg.pretrained and cfg.pretrained_file:
        errors.append(f"model.pretrained = True: give it or model.pretrained_file ({cfg.pretrained_file!r}), not both")
    elif cfg.pretrained and hf_cached_weights(model) is None:
        repo = (model.pretrained_cfg or {}).get("hf_hub_id")
        errors.append(f"model.pretrained = True: no weights for {cfg.name!r} in the local Hugging Face cache "
                      f"({repo or 'timm has no Hub weights for it'}); nothing is downloaded: put them there "
                      "(huggingface-cli download) or use model.pretrained_file")
