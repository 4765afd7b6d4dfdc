"""Recipe files to a validated `Recipe`: inheritance, command-line overrides, checks.

A recipe may name `base: other.yaml` (relative to itself) and hold only its differences.
Overrides come as `a.b=1` or `--a.b=1` (the two forms a wandb sweep agent passes);
values are parsed as YAML scalars. Everything here runs before any process group starts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from framework.checkpoint.paths import check_output_dir, check_run_name
from framework.recipe.errors import RecipeError, show
from framework.recipe.schema import Recipe, convert_section, field_paths, open_mappings, suggest, to_dict
from framework.recipe.yaml_io import load_yaml_file, parse_scalar

SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly")
MAX_BASE_DEPTH = 8


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    out = []
    for arg in args:
        text = arg[2:] if arg.startswith("--") else arg
        key, sep, raw = text.partition("=")
        if not sep or not key or any(c.isspace() for c in key):
            raise RecipeError(f"override {arg!r}: expected key=value or --key=value (e.g. optimizer.lr=0.05)")
        out.append((key, parse_scalar(raw)))
    return out


def _merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in _chain:
        raise RecipeError(f"{path}: recipe inheritance cycle: {' -> '.join(p.name for p in (*_chain, path))}")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise RecipeError(f"{path}: recipe inheritance deeper than {MAX_BASE_DEPTH} levels")
    data = load_yaml_file(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base = {base!r}: expected the file name of a base recipe")
    return _merge(load_raw(path.parent / base, (*_chain, path)), data)


def _route(data: dict, key: str) -> tuple[str, list, tuple[str, str] | None]:
    """An override's schema key, its path through the recipe, and the (list, entry name) it entered. A
    list of named sections (an `averaging` list) is entered by an entry's name: `averaging.<name>.ema.decay`,
    the key a sweep can set."""
    parts, schema, route, node, entered = key.split("."), [], [], data, None
    i = 0
    while i < len(parts):
        schema.append(parts[i])
        route.append(parts[i])
        node = node.get(parts[i]) if isinstance(node, dict) else None
        if isinstance(node, list) and i < len(parts) - 1:
            # as schema.averager_name: an entry's name, else its strategy
            names = [e.get("name") or e.get("strategy", "none") if isinstance(e, dict) else None for e in node]
            where = ".".join(parts[:i + 1])
            if parts[i + 1] not in names:
                rest = ".".join(parts[i + 1:])
                raise RecipeError(f"override {show(key)}: {where} is a list of averagers "
                                  f"({', '.join(map(str, names))}); name one: {where}.<name>.{rest}")
            route.append(names.index(parts[i + 1]))
            entered = (where, parts[i + 1])
            node = node[route[-1]]
            i += 1
        i += 1
    return ".".join(schema), route, entered


def apply_override(data: dict, key: str, value) -> None:
    schema_key, route, entered = _route(data, key)
    valid = field_paths(Recipe)
    if schema_key not in valid and not any(schema_key.startswith(m + ".") for m in open_mappings(Recipe)):
        hint = suggest(schema_key, valid)
        if entered is not None:  # suggest the key under the averager's name
            where, name = entered
            hint = hint.replace(f"'{where}.", f"'{where}.{name}.", 1)
        raise RecipeError(f"override {show(key)}: unknown key{hint}")
    node = data
    for part, after in zip(route[:-1], route[1:], strict=True):
        child = node[part] if isinstance(part, int) else node.setdefault(part, {})
        if not isinstance(child, list if isinstance(after, int) else dict):
            raise RecipeError(f"override {show(key)}: {part!r} is {child!r}, not a section")
        node = child
    existing = node[route[-1]] if isinstance(route[-1], int) else node.get(route[-1])
    # a section given whole (a wandb agent's nested parameter) updates the recipe's section
    node[route[-1]] = _merge(existing, value) if isinstance(value, dict) and isinstance(existing, dict) else value


def _check_semantics(r: Recipe, errors: list[str]) -> None:
    check_run_name(r.name, errors)
    import timm  # slow import: only once the schema has passed
    import timm.optim
    import torch

    from framework.averaging.checks import check_averagers
    from framework.bn.inputs import check_recompute_inputs
    from framework.data.loaders import check_augment
    from framework.data.mixup import check_mixup
    from framework.training.best import check_best
    from framework.training.builders import check_optimizer_keywords, optimizer_refusal
    from framework.training.losses import check_loss
    from framework.training.models import check_model

    if not timm.is_model(r.model.name):
        errors.append(f"model.name = {r.model.name!r}: not a timm model{suggest(r.model.name, timm.list_models())}")
    if r.model.pretrained_file is not None and not Path(r.model.pretrained_file).is_file():
        errors.append(f"model.pretrained_file = {r.model.pretrained_file!r}: file not found (weights are never downloaded)")
    if r.optimizer.name.lower() not in timm.optim.list_optimizers():
        errors.append(f"optimizer.name = {r.optimizer.name!r}: not a timm optimizer{suggest(r.optimizer.name, timm.optim.list_optimizers())}")
    elif (why := optimizer_refusal(r.optimizer.name, torch.cuda.is_available())) is not None:
        errors.append(f"optimizer.name = {r.optimizer.name!r}: not supported: {why}")
    else:
        check_optimizer_keywords(r.optimizer, errors)
    _check_schedule(r.schedule, errors)
    check_augment(r.data, errors)
    check_mixup(r.mixup, r.data.batch_size, r.schedule.epochs, errors)
    check_loss(r.loss, r.mixup.active, errors)
    check_recompute_inputs(r.bn.recompute_inputs, r.mixup.active, errors)
    check_averagers(r.averaging, r.schedule.epochs, r.backend, errors)
    check_best(r.export.best, r.averaging, r.eval.bn_sources, errors)
    if r.eval.every_epochs > 1 and r.schedule.name == "plateau" and r.schedule.plateau_metric.startswith("eval/"):
        errors.append(f"eval.every_epochs = {r.eval.every_epochs}: schedule.name = 'plateau' reads "
                      f"{r.schedule.plateau_metric} after every epoch; use 1, or schedule.plateau_metric = 'train/loss'")
    if r.model.pretrained_file is None or Path(r.model.pretrained_file).is_file():
        check_model(r.model, r.data.image_size, errors)
    b = r.backend
    if b.type == "deepspeed" and r.optimizer.clip_grad is not None and r.optimizer.clip_mode != "norm":
        errors.append(f"optimizer.clip_mode = {r.optimizer.clip_mode!r}: DeepSpeed's engine clips by norm only; use 'norm', or ddp")
    if b.type != "deepspeed":
        for key, value in (("zero_stage", b.zero_stage), ("offload_optimizer", b.offload_optimizer),
                           ("offload_params", b.offload_params and b.type != "fsdp")):
            if value:
                errors.append(f"backend.{key} = {getattr(b, key)!r}: only with backend.type = 'deepspeed' (got {b.type!r})")
    if b.type == "fsdp":
        from framework.distributed.fsdp import fsdp_refusals

        errors += fsdp_refusals(r)
    elif not b.reshard_after_forward:
        errors.append(f"backend.reshard_after_forward = False: only with backend.type = 'fsdp' (got {b.type!r})")
    if b.find_unused_parameters and b.type != "ddp":
        errors.append(f"backend.find_unused_parameters = True: DDP only (got backend.type = {b.type!r})")
    if b.loss_scale.init != 2.0 ** round(math.log2(b.loss_scale.init)):
        errors.append(f"backend.loss_scale.init = {b.loss_scale.init!r}: must be a power of two (e.g. 65536.0); "
                      "DeepSpeed takes it as one")
    if b.offload_optimizer and b.zero_stage == 0:
        errors.append("backend.offload_optimizer = True: needs backend.zero_stage 1, 2 or 3 (got 0)")
    if b.offload_params and b.type == "deepspeed" and b.zero_stage != 3:
        errors.append(f"backend.offload_params = True: needs backend.zero_stage 3 (got {b.zero_stage})")
    if b.type == "deepspeed" and r.faults.nonfinite == "skip":
        errors.append("faults.nonfinite = 'skip': not under DeepSpeed, whose engine steps inside backward; use 'raise'")
    d = r.data
    bad_splits = [key for key in ("train_split", "val_split") if not _is_split_name(getattr(d, key))]
    errors += [f"data.{key} = {getattr(d, key)!r}: expected the name of a split inside data.root (e.g. train, val)"
               for key in bad_splits]
    if bad_splits:
        pass
    elif d.source == "folder" and d.root is None:
        errors.append("data.root = None: source 'folder' needs an image folder with train and val splits")
    elif d.source == "digits":  # written at the first run (never by validation): its two splits are known
        from framework.data.loaders import DIGITS_SPLITS

        errors += [f"data.{key} = {getattr(d, key)!r}: the digits have the splits {', '.join(DIGITS_SPLITS)}"
                   for key in ("train_split", "val_split") if getattr(d, key) not in DIGITS_SPLITS]
    elif d.source == "folder":
        from framework.data.loaders import split_path

        root = Path(d.root)
        missing = False
        for split in (d.train_split, d.val_split):
            if split_path(root, split) is None:
                missing = True
                errors.append(f"data.root = {str(root)!r}: {root / split} not found, as a folder or as {split}.tar "
                              f"(data.{'train' if split == d.train_split else 'val'}_split = {split!r})")
        if not missing:
            _check_classes(r, errors)
    elif d.source == "timm":
        from framework.data.timm_datasets import check_timm_dataset

        check_timm_dataset(d, r.model.num_classes, errors)
    elif d.source == "fashion_mnist":
        from framework.data.fashion_mnist import check_files

        check_files(d.root, errors)
    if d.source != "timm" and d.dataset is not None:
        errors.append(f"data.dataset = {d.dataset!r}: only with data.source = 'timm' (got {d.source!r})")
    if d.source != "folder" and d.class_map is not None:
        errors.append(f"data.class_map = {d.class_map!r}: only with data.source = 'folder' (got {d.source!r})")
    for key, pair in (("scale", d.augment.scale), ("ratio", d.augment.ratio)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            errors.append(f"data.augment.{key} = {pair!r}: expected [low, high] with 0 < low <= high")
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is not None and len(value) != r.model.in_chans:
            errors.append(f"data.{key} = {value!r}: expected {r.model.in_chans} values (model.in_chans)")


def _is_split_name(split: str) -> bool:
    path = Path(split)
    return bool(split.strip()) and not path.is_absolute() and ".." not in path.parts and path != Path(".")


def _check_schedule(s, errors: list[str]) -> None:
    if s.name not in SCHEDULERS:
        errors.append(f"schedule.name = {s.name!r}: choices are {', '.join(SCHEDULERS)}")
    if s.warmup_epochs >= s.epochs:
        errors.append(f"schedule.warmup_epochs = {s.warmup_epochs}: must be < schedule.epochs ({s.epochs})")
    m = s.decay_milestones
    if s.name == "multistep" and not m:
        errors.append(f"schedule.decay_milestones = {m!r}: schedule.name = 'multistep' needs the epochs to decay at "
                      f"(e.g. [{s.epochs // 2}, {3 * s.epochs // 4}])")
    elif m is not None and s.name != "multistep":
        errors.append(f"schedule.decay_milestones = {m!r}: only with schedule.name = 'multistep' (got {s.name!r}; "
                      "step decays every schedule.decay_epochs)")
    elif m and (m != sorted(set(m)) or m[0] < 1 or m[-1] >= s.epochs):
        errors.append(f"schedule.decay_milestones = {m!r}: expected increasing epochs between 1 and schedule.epochs - 1 "
                      f"({s.epochs - 1})")


def _check_classes(r: Recipe, errors: list[str]) -> None:
    """One class numbering for both splits (framework.data.loaders.folder_class_map): refuse what would shift labels."""
    from framework.data.loaders import folder_class_map, split_classes

    d, root = r.data, Path(r.data.root)
    if d.class_map is not None and not Path(d.class_map).is_file():
        errors.append(f"data.class_map = {d.class_map!r}: file not found (one class folder name per line)")
        return
    classes = folder_class_map(root, d.train_split, d.class_map)
    for key, split in (("train_split", d.train_split), ("val_split", d.val_split)):
        unknown = [c for c in split_classes(root, split) if c not in classes]
        if unknown:
            where = f"data.class_map ({d.class_map})" if d.class_map else f"the training split ({root / d.train_split})"
            errors.append(f"data.{key} = {split!r}: classes {', '.join(unknown)} are not in {where}; every class must be "
                          "in the class map, whose numbering both splits share")
    if len(classes) > r.model.num_classes:
        errors.append(f"model.num_classes = {r.model.num_classes}: the data has {len(classes)} classes")


def resolve_recipe(path: str | Path, overrides: list[str] = (), world_size: int = 1) -> Recipe:
    """Load, merge, override and validate for a launch of `world_size` processes (the data must fill a batch
    on each). Raises RecipeError listing every problem."""
    path = Path(path)
    data = load_raw(path)
    for key, value in parse_overrides(list(overrides)):
        apply_override(data, key, value)
    data.setdefault("name", path.stem)
    errors: list[str] = []
    recipe = convert_section(Recipe, data, errors)
    if not errors:
        _check_semantics(recipe, errors)
    if not errors:
        recipe.output.dir = recipe.output.dir.replace("${name}", recipe.name)
        check_output_dir(Path(recipe.output.dir), errors)
    if not errors:  # checks that open the data and the checkpoints, once everything they read is known good
        from framework.checkpoint.fingerprint import check_resume
        from framework.data.sizes import check_data_size

        check_data_size(recipe.data, world_size, errors)
        check_resume(recipe, errors)
    if errors:
        raise RecipeError(errors[0], errors)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return to_dict(recipe)
