"""Safe YAML for recipes: no aliases, no duplicate keys, `1e-5` read as a number.

PyYAML's SafeLoader still expands alias bombs, silently keeps the last of two
duplicate keys and reads `1e-5` as a string; a recipe loader must do none of that.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

from framework.recipe.errors import RecipeError, show

# YAML 1.2 floats: the exponent does not need a dot (`1e-5`, `3E2`).
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _RecipeLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RecipeError(f"YAML aliases (*{event.anchor}) are not allowed in recipes (line {event.start_mark.line + 1})")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise RecipeError(f"YAML anchors (&{event.anchor}) are not allowed in recipes (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(f"duplicate key {show(key)!r} (line {key_node.start_mark.line + 1}): each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Replace the float resolver (keep the others: int, bool, null, ...).
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - _RecipeLoader is a SafeLoader
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source}: YAML syntax error{where}: {problem}") from None


def load_yaml_file(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a text file (byte {err.start} is not UTF-8); a recipe is a YAML mapping") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe file ({err.strerror})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise RecipeError(f"{path}: recipe file is empty; it must be a mapping of sections (model, data, ...)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_scalar(text: str) -> Any:
    """Parse an override value the way a recipe would, plus what a wandb agent prints with Python's
    `str()`: `None`, and nested parameters as one Python literal (`{'type': 'deepspeed', 'zero_stage': 3}`)."""
    if text == "None":
        return None
    if text[:1] in "{[" and len(text) <= 10_000:
        try:
            return ast.literal_eval(text)  # literals only: never evaluates code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass  # not Python: a YAML flow collection, parsed below
    return parse_yaml(text, "override value")


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
