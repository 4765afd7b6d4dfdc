"""`bnswa train RECIPE [overrides] [--num-processes N] [--verbose]` (or `python -m framework train ...`): check, then launch.
`python -m framework validate RECIPE [overrides]`: print the resolved recipe or its errors.
`python -m framework compare RUN_DIR... [--out DIR] [--wandb MODE]`: compare finished runs.
`bnswa eval WEIGHTS_OR_FOLDER RECIPE [overrides] [--recompute-bn] [--num-processes N]`: evaluate saved weights."""

from __future__ import annotations

import sys

COMMANDS = ("train", "eval", "validate", "compare")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        print(f"error: command {got!r}: choices are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if argv[0] == "train":
        from framework.distributed.launcher import train_main

        return train_main(argv[1:])
    if argv[0] == "eval":
        from framework.training.evaluate_saved import eval_main

        return eval_main(argv[1:])
    if argv[0] == "compare":
        from framework.reporting.compare import main as compare_main

        return compare_main(argv[1:])
    from framework.recipe.cli import validate_main

    return validate_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
