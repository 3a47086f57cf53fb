"""The ``trt-twotower`` command line: one sub-command per pipeline stage."""

from __future__ import annotations

from typing import Any

import click

from .. import __version__
from ..errors import TwoTowerError
from .bench import bench_command
from .build import build_command
from .convert import convert_command
from .generate import generate_command
from .inspect import inspect_command
from .make_checkpoint import make_checkpoint_command
from .parity import parity_command
from .plan import plan_command
from .serve import client_command, serve_command


def one_line(message: str) -> str:
    """A message on one line, so that a user's error reads as one ``Error:`` line."""
    return " ".join(message.split())


class TwoTowerGroup(click.Group):
    """Prints an error a user caused (a TwoTowerError) as click's one-line ``Error: ...``
    with exit code 1, whichever command raised it: a bad input never ends in a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TwoTowerError as err:
            raise click.ClickException(one_line(str(err))) from None


@click.group(cls=TwoTowerGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trt-twotower")
def main() -> None:
    """Nemotron-Labs-TwoTower from its checkpoint to TensorRT engines served by Triton.

    Every command defaults to the small built-in model, so the whole pipeline runs on a CPU.
    Pass --checkpoint DIR for a real checkpoint or --preset NAME for random weights.
    """


for command in (make_checkpoint_command, convert_command, build_command, plan_command,
                inspect_command, parity_command, generate_command, bench_command,
                serve_command, client_command):
    main.add_command(command)
