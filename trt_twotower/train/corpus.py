"""The offline corpus: the Python standard library's source, split by file into train and
held-out with a stable hash of each file's path, so every machine with the same Python gets
the same split."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Optional

import torch

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.05
MAX_FILE_BYTES = 200_000
EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(relative: str) -> str:
    digest = hashlib.sha1(relative.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") / 2**32 < HELDOUT_FRACTION else "train"


def stdlib_files(split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS & set(relative.parts) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        if _split_of(relative.as_posix()) == split:
            files.append(path)
    return files


def read_texts(split: str, max_files: Optional[int] = None) -> list[str]:
    files = stdlib_files(split)[:max_files]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def token_stream(tokenizer, split: str, max_tokens: Optional[int] = None,
                 eos_id: int = 2) -> torch.Tensor:
    """Documents concatenated, each followed by EOS; stops once ``max_tokens`` are reached."""
    ids: list[int] = []
    for text in read_texts(split):
        ids.extend(tokenizer.encode(text))
        ids.append(eos_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
