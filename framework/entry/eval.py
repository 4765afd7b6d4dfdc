"""Entry point of `bnswa eval`: `accelerate launch ... launch/eval.py WEIGHTS_OR_FOLDER RECIPE [overrides] [--recompute-bn]`.

Every process checks the recipe and the weights before any process group starts (one line, exit 2);
the main process prints one `eval: {...}` JSON line.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from framework.recipe.cli import USER_ERROR, load_or_exit
    from framework.recipe.errors import print_errors
    from framework.training.evaluate_saved import USAGE, check_weights, evaluate_saved, split_args

    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    weights, recompute, recipe_argv = split_args(argv)
    if weights is None or not recipe_argv:
        print_errors([USAGE])
        return USER_ERROR
    recipe = load_or_exit(recipe_argv, quiet_rank=quiet, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    errors = check_weights(weights, recipe)
    if errors:
        if not quiet:
            print_errors(errors)
        return USER_ERROR
    import torch.distributed as dist

    result = evaluate_saved(weights, recipe, recompute)
    if os.environ.get("RANK", "0") == "0":
        print("eval: " + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo can abort at exit without it
    return 0


if __name__ == "__main__":  # run as a file by the launcher: the package holding it comes first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(sys.argv[1:]))
