"""Render ``triton_repo/`` templates into a model repository for one model source.

Templates use ``${NAME}`` placeholders; rendering fails loudly on any value left unfilled.
"""

from __future__ import annotations

import re
import shutil
import string
from pathlib import Path
from typing import Mapping

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "triton_repo"
MODELS = ("preprocessing", "twotower_bls", "postprocessing", "ensemble")
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class RepositoryError(RuntimeError):
    """A template that could not be filled, or a repository that is missing a model."""


def render(out_dir: Path, values: Mapping[str, str], templates: Path = TEMPLATES) -> Path:
    """Copy every model folder, filling the placeholders of each config.pbtxt."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for model in MODELS:
        source = templates / model
        if not (source / "config.pbtxt").is_file():
            raise RepositoryError(f"template {source}/config.pbtxt is missing")
        shutil.copytree(source, out_dir / model, ignore=shutil.ignore_patterns("__pycache__"))
        config = out_dir / model / "config.pbtxt"
        text = config.read_text()
        missing = sorted(set(PLACEHOLDER.findall(text)) - set(values))
        if missing:
            raise RepositoryError(f"{model}/config.pbtxt: no value for {', '.join(missing)}")
        config.write_text(string.Template(text).substitute(values))
        # Every model needs a version folder; the ensemble's holds no files (git keeps none).
        (out_dir / model / "1").mkdir(exist_ok=True)
    return out_dir
