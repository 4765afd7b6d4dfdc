"""Strict reading of timm's augmentation policy strings (`data.augment.auto_augment`).

timm's parsers skip a section that has no number (`rand-m9-inc` runs without increasing severity,
`mstd` without a value is dropped, `zz` is ignored) and read any `t...` section of RandAugment as the
default op set. A user who asked for something must get it or hear why, so every section is checked
here against the sections timm documents (timm/data/auto_augment.py) before timm parses the string.
"""

from __future__ import annotations

import re

FLAG = "0|1"
# section key -> kind of value; `t` (RandAugment's op set) takes a name
RAND = {"m": "int", "n": "int", "p": "float", "mstd": "float", "mmax": "int", "inc": FLAG}
RAND_OP_SETS = ("weights", "3a", "3aw")
AUGMIX = {"m": "int", "w": "int", "d": "int", "a": "float", "b": FLAG, "mstd": "float"}
AUTO = {"mstd": "float"}
AUTO_POLICIES = ("v0", "v0r", "original", "originalr", "3a")
_NUMBER = {"int": r"\d+", "float": r"\d+(\.\d*)?|\.\d+", FLAG: r"[01]"}


def _describe(sections: dict) -> str:
    listed = ", ".join(f"{k}<{kind}>" for k, kind in sections.items())
    return listed + (f", t<{'|'.join(RAND_OP_SETS)}>" if sections is RAND else "")


def _check_section(section: str, sections: dict, family: str) -> str | None:
    key, number = re.match(r"([^\d.]*)(.*)", section).groups()
    if key not in sections:
        return f"unknown {family} section {section!r}; sections are {_describe(sections)}"
    if not number:
        return f"{family} section {key!r} needs a value ({key}<{sections[key]}>, e.g. {key}1)"
    if not re.fullmatch(_NUMBER[sections[key]], number):
        return f"{family} section {section!r}: {number!r} is not a value of {key}<{sections[key]}>"
    return None


def policy_problem(policy: str) -> str | None:
    """Why timm would not run `policy` as written, or None. Families: rand-..., augmix-..., an AutoAugment name."""
    head, *sections = policy.split("-")
    if head == "rand":
        family, allowed = "RandAugment", RAND
    elif head == "augmix":
        family, allowed = "AugMix", AUGMIX
    elif head in AUTO_POLICIES:
        family, allowed = "AutoAugment", AUTO
    else:
        return (f"unknown policy {head!r}; expected rand-<sections> (RandAugment), augmix-<sections> (AugMix) or "
                f"an AutoAugment policy ({', '.join(AUTO_POLICIES)})")
    seen = set()
    for section in sections:
        if family == "RandAugment" and section.startswith("t"):
            key, problem = "t", (None if section[1:] in RAND_OP_SETS else
                                 f"RandAugment op set {section!r}: choices are {', '.join('t' + s for s in RAND_OP_SETS)}")
        else:
            key, problem = re.match(r"[^\d.]*", section).group(), _check_section(section, allowed, family)
        if problem is None and key in seen:
            problem = f"{family} section {key!r} given twice"
        if problem is not None:
            return problem
        seen.add(key)
    return None
