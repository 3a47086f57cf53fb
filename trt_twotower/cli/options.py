"""Options that several commands share, written once so they read the same everywhere."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..config import PRESETS

F = Callable[..., Any]
# Every command spells a precision either way: short names map to the dtype they mean.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ENGINE_DTYPES = ("bfloat16", "float16")
# Seeds become int64 (torch generators, the server's seed input): larger ones cannot be used.
SEED = click.IntRange(0, 2**63 - 1)
# Token counts and sizes sent to the server are int32 tensors: a larger value would wrap.
INT32_COUNT = click.IntRange(1, 2**31 - 1)


class Dtype(click.ParamType):
    """A precision from ``allowed`` by its long or short name (bf16 and bfloat16 alike),
    returned as the long name the rest of the package uses."""

    name = "dtype"

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed

    def get_metavar(self, param: click.Parameter, ctx: Optional[click.Context] = None) -> str:
        short = {v: k for k, v in DTYPE_ALIASES.items()}
        return "[" + "|".join(f"{short[a]}|{a}" if a in short else a
                              for a in self.allowed) + "]"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> str:
        name = DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
        if name not in self.allowed:
            self.fail(f"{value!r} is not one of {', '.join(self.allowed)} (or bf16, fp16, "
                      "fp32)", param, ctx)
        return name


def token_budget_option(default: int, help: str) -> Callable[[F], F]:
    """The token budget under one name in every command (``--max-tokens``, as Triton and
    the OpenAI API call it), with ``--max-new-tokens`` kept as an alias."""
    return click.option("--max-tokens", "--max-new-tokens", "max_new_tokens",
                        type=INT32_COUNT, default=default, show_default=True, help=help)


class PositiveNumber(click.ParamType):
    """A finite number above 0 (seconds, megabytes): click's FloatRange lets nan and inf
    through, which fail far from the option that gave them."""

    name = "number"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not 0 < number < math.inf:
            self.fail(f"{value!r} is not a finite number above 0", param, ctx)
        return number


class NumberList(click.ParamType):
    """Comma-separated numbers, each within [low, high], e.g. 8,16: checked when the options
    are read, not when a sweep or a server reaches the bad one."""

    def __init__(self, kind: type, low: float, high: float, allow_empty: bool = False) -> None:
        self.kind, self.low, self.high, self.allow_empty = kind, low, high, allow_empty
        self.name = f"{kind.__name__}s"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> tuple:
        if isinstance(value, tuple):
            return value
        example = "8,16" if self.kind is int else "0.5,0.9"
        try:
            items = tuple(self.kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s such "
                      f"as {example}", param, ctx)
        if not items and not self.allow_empty:
            self.fail(f"needs at least one value, such as {example}", param, ctx)
        bad = [v for v in items if not self.low <= v <= self.high]
        if bad:
            self.fail(f"{bad[0]} is out of range: each value must lie in "
                      f"[{self.kind(self.low)}, {self.kind(self.high)}]", param, ctx)
        return items


class Device(click.ParamType):
    """cpu, cuda or cuda:N (as cuda:N), refused unless this machine has that GPU: torch
    would otherwise fail deep inside model loading."""

    name = "device"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> str:
        if value == "cpu":
            return value
        match = re.fullmatch(r"cuda(?::(\d+))?", str(value))
        if match is None:
            self.fail(f"{value!r} is neither cpu nor cuda:N (cuda:0, cuda:1, ...)", param, ctx)
        import torch
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            have = f"GPUs cuda:0..cuda:{count - 1}" if count else "no CUDA GPU"
            self.fail(f"{value} is not here: this machine has {have}; use cpu or one of its "
                      "GPUs", param, ctx)
        return f"cuda:{index}"


def created_dir(path: Path, option: str) -> Path:
    """``path``, created now: a folder that cannot be made is refused before any work runs,
    not after it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.BadParameter(f"cannot create {path}: {err.strerror or err}",
                                 param_hint=option) from None
    return path


def utf8_text(ctx: click.Context, param: click.Parameter, value: Optional[str]
              ) -> Optional[str]:
    """A text option must be valid UTF-8: bytes that are not arrive as lone surrogates, which
    the tokenizer and the client cannot encode."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise click.BadParameter(f"is not valid UTF-8 text (character {err.start}); pass "
                                     "the prompt as UTF-8", ctx, param) from None
    return value


def model_source_options(func: F) -> F:
    """--checkpoint / --preset: where the model comes from (default: the built-in model)."""
    func = click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
                        help="Random weights of a named configuration instead of a checkpoint.")(func)
    return click.option("--checkpoint", type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path),
                        help="A TwoTower checkpoint directory (config.json, safetensors, "
                             "tokenizer.json). Default: the built-in model.")(func)


def dtype_option(default: str = "float32") -> Callable[[F], F]:
    return click.option("--dtype", type=Dtype(("float32", "bfloat16", "float16")),
                        default=default, show_default=True,
                        help="Precision the model computes in.")


def source_argument_options(func: F) -> F:
    """[CHECKPOINT] / --preset: the model to convert or build (default: the built-in)."""
    func = click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
                        help="Random weights of a named configuration instead of a checkpoint.")(func)
    return click.argument("checkpoint", required=False,
                          type=click.Path(exists=True, file_okay=False, path_type=Path))(func)
