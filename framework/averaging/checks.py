"""Validation of `averaging`: one section, or a list of averagers run side by side."""

from __future__ import annotations

import re

from framework.bn.sources import BN_SOURCES, NO_STATS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # it names files and metric keys


def check_averagers(averaging, epochs: int, backend, errors: list[str]) -> None:
    from framework.averaging import AVERAGERS, create_rule
    from framework.recipe.schema import averager_name

    many = isinstance(averaging, list)
    entries = averaging if many else [averaging]
    if many and not entries:
        errors.append("averaging = []: an empty list; give one averager or more, or strategy 'none'")
    names, lr_owners = [], []
    for i, a in enumerate(entries):
        key = f"averaging[{i}]" if many else "averaging"
        if a.strategy == "none":
            if many:
                errors.append(f"{key}.strategy = 'none': every entry of the list averages (drop the entry)")
            continue
        name = averager_name(a)
        if a.name is not None and (not NAME.match(a.name) or a.name in (*BN_SOURCES, NO_STATS)):
            errors.append(f"{key}.name = {a.name!r}: letters, digits and . _ + - only, and not a BN source's name "
                          f"({', '.join((*BN_SOURCES, NO_STATS))})")
        if name in names:
            errors.append(f"{key}.name = {a.name!r}: {name!r} names an earlier averager too; each needs its own name")
        names.append(name)
        if create_rule(a.strategy, getattr(a, a.strategy)).sets_lr:
            lr_owners.append(name)
        if a.start_epoch is not None and a.start_epoch >= epochs:
            errors.append(f"{key}.start_epoch = {a.start_epoch}: averaging would never start; must be < schedule.epochs "
                          f"({epochs})")
        if backend.type == "deepspeed" and backend.zero_stage not in AVERAGERS[a.strategy].zero_stages:
            stages = ", ".join(map(str, AVERAGERS[a.strategy].zero_stages))
            errors.append(f"{key}.strategy = {a.strategy!r}: cannot run under ZeRO stage {backend.zero_stage} "
                          f"(it supports stages {stages})")
    if len(lr_owners) > 1:
        errors.append(f"averaging: {', '.join(lr_owners)} each set the learning rate (SWALR: swa.lr); one run has one "
                      "rate, so at most one averager may (set swa.lr: null on the others)")
