"""Command-line front doors: validation errors become one line each and exit code 2."""

from __future__ import annotations

from framework.recipe.errors import RecipeError, print_errors
from framework.recipe.resolve import recipe_to_dict, resolve_recipe
from framework.recipe.schema import Recipe
from framework.recipe.yaml_io import dump_yaml

USER_ERROR = 2


def load_or_exit(argv: list[str], quiet_rank: bool = False, world_size: int = 1) -> Recipe:
    """Resolve `RECIPE [overrides...]` for `world_size` processes or print the errors and exit 2 (no traceback,
    nothing written)."""
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        _fail(["usage: RECIPE.yaml [key=value | --key=value ...]"], quiet_rank)
    try:
        return resolve_recipe(argv[0], argv[1:], world_size)
    except RecipeError as err:
        _fail(err.errors, quiet_rank)


def _fail(lines: list[str], quiet: bool):
    if not quiet:  # under a multi-process launch, only local rank 0 prints
        print_errors(lines)
    raise SystemExit(USER_ERROR)


def validate_main(argv: list[str]) -> int:
    recipe = load_or_exit(argv)
    print(dump_yaml(recipe_to_dict(recipe)), end="")
    return 0
