"""Train the built-in TwoTower (both stages) and write its checkpoint.

    python build_scripts/train_builtin.py                  # full recipe → trt_twotower/builtin/model
    python build_scripts/train_builtin.py --toy --out /tmp/toy   # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trt_twotower.reference.sources import BUILTIN_CHECKPOINT
from trt_twotower.train.recipe import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUILTIN_CHECKPOINT)
    parser.add_argument("--toy", action="store_true", help="a few steps of a tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run_recipe(args.out, "toy" if args.toy else "full", args.seed)
    print(json.dumps(result["log"], indent=2))


if __name__ == "__main__":
    main()
