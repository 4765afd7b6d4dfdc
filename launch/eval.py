"""`accelerate launch --config_file accelerate_config.yaml launch/eval.py ...`: the evaluation workers' entry
script, for launches by hand, sweeps and SLURM. Its code ships in the package (framework/entry/eval.py),
which `bnswa eval` launches wherever the package is installed."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from framework.entry.eval import main

    sys.exit(main(sys.argv[1:]))
