"""The one import point of TensorRT: ``tensorrt`` on GPU hosts, ``tensorrt_rtx`` for CPU-only
builds and RTX workstations. Everything else codes against the common API of the module this
returns."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import TwoTowerError

FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = {"tensorrt": "pip install tensorrt (a GPU host with NVIDIA's index)",
                "tensorrt-rtx": "pip install tensorrt-rtx-cu12"}


class FlavorError(TwoTowerError, RuntimeError):
    """No TensorRT flavour could be imported, or not the one asked for."""


@dataclass(frozen=True)
class Flavor:
    name: str
    module: ModuleType

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"


def find_flavor(preference: str = "auto") -> Flavor:
    """``auto`` prefers full TensorRT and falls back to TensorRT-RTX."""
    if preference != "auto" and preference not in FLAVORS:
        raise FlavorError(f"unknown TensorRT flavour {preference!r}; choose auto, "
                          f"{', '.join(FLAVORS)}")
    candidates = list(FLAVORS) if preference == "auto" else [preference]
    errors = []
    for name in candidates:
        try:
            return Flavor(name, importlib.import_module(FLAVORS[name]))
        except ImportError as err:
            errors.append(f"{name}: {err} ({INSTALL_HINT[name]})")
    raise FlavorError("no TensorRT found: " + "; ".join(errors))
