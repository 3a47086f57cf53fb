"""Render ``triton_repo/`` templates into a model repository for one model source.

Templates use ``${NAME}`` placeholders; rendering fails loudly on any value left unfilled.
Each rendering also draws a fresh tower secret (``SECRET_FILE``, readable by this user only):
the tower models refuse every request that does not carry it, and only the orchestrator
reads it. It is kept out of config.pbtxt because Triton serves model configs to clients.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import string
from pathlib import Path
from typing import Mapping, Optional

from ..errors import TwoTowerError


def _templates() -> Path:
    """An installed package carries the templates as ``trt_twotower/triton_repo`` (setup.py
    copies them there); a source checkout keeps them at the repository root."""
    package = Path(__file__).resolve().parent.parent
    inside = package / "triton_repo"
    return inside if inside.is_dir() else package.parent / "triton_repo"


TEMPLATES = _templates()
CONTEXT_MODEL, DENOISER_MODEL = "context_tower", "denoiser_tower"
TOWER_MODELS = (CONTEXT_MODEL, DENOISER_MODEL)
MODELS = ("preprocessing", *TOWER_MODELS, "twotower_bls", "postprocessing", "ensemble")
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
SECRET_FILE = "tower_secret"


class RepositoryError(TwoTowerError, RuntimeError):
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
        # Every model needs a version folder (git keeps no empty one).
        (out_dir / model / "1").mkdir(exist_ok=True)
    _write_secret(out_dir / SECRET_FILE)
    return out_dir


def _write_secret(path: Path) -> None:
    """Created with mode 0600 from the start, so no other user ever can read it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_urlsafe(32))


def tower_secret(model_dir: Path) -> str:
    """The secret of the repository a Triton model (its directory) was loaded from."""
    path = Path(model_dir).parent / SECRET_FILE
    try:
        return path.read_text().strip()
    except OSError as err:
        raise RepositoryError(f"{path} is unreadable ({err.strerror}): render the repository "
                              "again with trt-twotower serve") from None


def placement(device: str) -> str:
    """An ``instance_group`` placement for a torch device string: ``cpu`` or ``cuda:N``."""
    if device == "cpu":
        return "kind: KIND_CPU"
    if re.fullmatch(r"cuda:\d+", device):
        return f"kind: KIND_GPU gpus: [ {device.split(':')[1]} ]"
    raise RepositoryError(f"device {device!r} is neither cpu nor cuda:N")


# Tokens a streamed message carries at least, after a request's first (the orchestrator's
# HeldTokens). An AR row alone takes 4 tokens a call (--ar-steps), so a quiet server's AR
# messages change little; under load, where a call gives each row 2-3 tokens, about half the
# messages go. Every message costs the orchestrator, tritonserver and the client, and on the
# 2-core machine those slow the context tower's steps beside them (docs/scheduler.md, Triton).
STREAM_INTERVAL = 4


def repository_values(source: str, backend: str, tokenizer_dir: Path, context_device: str,
                      denoiser_device: str, max_context: int, max_tokens: int,
                      block_sizes: str, capacity: int = 64, bls_instances: int = 1,
                      dtype: str = "auto", cpu_threads: Optional[int] = None,
                      prefill_tokens: int = 256, max_waiting: int = 1024,
                      ar_steps: int = 4, stream_interval: int = STREAM_INTERVAL
                      ) -> dict[str, str]:
    """Every template value of the repository, from the serve options. ``capacity`` is the
    towers' sequence slots, shared by the orchestrator's instances (each runs one step loop
    over its share). ``prefill_tokens``: prompt tokens a round pushes; ``ar_steps``: AR
    tokens a row takes per round when every live row is AR; ``stream_interval``: tokens a
    streamed message carries at least after the first; ``max_waiting``:
    requests that may wait for a slot before the server answers busy. ``cpu_threads``:
    PyTorch threads per tower process (0 = PyTorch's default); by default two towers on the
    CPU split its cores, which leaves the orchestrator and the network threads room (measured
    faster on 2 cores than both towers taking every core in turn)."""
    if bls_instances < 1 or capacity < bls_instances:
        raise RepositoryError(f"need at least one orchestrator instance and a capacity of at "
                              f"least one request per instance (got capacity {capacity} for "
                              f"{bls_instances} instances)")
    for name, value in (("prefill_tokens", prefill_tokens), ("max_waiting", max_waiting),
                        ("ar_steps", ar_steps), ("stream_interval", stream_interval)):
        if value < 1:
            raise RepositoryError(f"{name} must be at least 1, got {value}")
    return {"SOURCE": source, "BACKEND": backend,
            "TOKENIZER_DIR": str(Path(tokenizer_dir).resolve()),
            "CONTEXT_PLACEMENT": placement(context_device),
            "DENOISER_PLACEMENT": placement(denoiser_device),
            "MAX_CONTEXT": str(max_context), "MAX_TOKENS": str(max_tokens),
            "BLOCK_SIZES": block_sizes, "CAPACITY": str(capacity),
            "BLS_INSTANCES": str(bls_instances), "DTYPE": dtype,
            "CPU_THREADS": str(tower_threads(context_device, denoiser_device, cpu_threads)),
            "PREFILL_TOKENS": str(prefill_tokens), "MAX_WAITING": str(max_waiting),
            "AR_STEPS": str(ar_steps), "STREAM_INTERVAL": str(stream_interval)}


def tower_threads(context_device: str, denoiser_device: str, asked: Optional[int]) -> int:
    if asked is not None:
        if asked < 0:
            raise RepositoryError(f"cpu_threads must be 0 or more, got {asked}")
        return asked
    on_cpu = [context_device, denoiser_device].count("cpu")
    return max(1, (os.cpu_count() or 1) // on_cpu) if on_cpu else 0
