"""Field metadata for recipe sections: bounds and a one-line doc."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def spec(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, doc: str = "", factory=None):
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
