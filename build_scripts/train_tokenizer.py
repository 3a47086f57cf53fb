"""Rebuild the built-in tokenizer (trt_twotower/builtin/tokenizer.json) from the train split
of the standard-library corpus. Deterministic: the same Python gives the same file."""

from __future__ import annotations

import argparse
from pathlib import Path

from trt_twotower.tokenizer import BUILTIN_TOKENIZER, train_builtin_tokenizer
from trt_twotower.train.corpus import read_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=BUILTIN_TOKENIZER)
    parser.add_argument("--files", type=int, default=400, help="train files used")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = train_builtin_tokenizer(read_texts("train", args.files), args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    print(f"wrote {args.out} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
