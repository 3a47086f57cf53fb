"""Open one tower for a Triton tower model: its executor on the model instance's device,
wrapped with its slot pool (``towers.py``). The one place that maps a repository's
``source``/``backend`` parameters to executors."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from ..reference.loading import TOWER_GROUPS
from ..runtime import backends
from .towers import ContextTower, DenoiserTower


def instance_device(kind: str, device_id: Union[str, int]) -> str:
    """Triton's instance kind and device id → a torch device string."""
    return f"cuda:{int(device_id)}" if str(kind).upper().endswith("GPU") else "cpu"


def open_tower(tower: str, source: str, backend: str, device: str, max_context: int,
               capacity: int, dtype: str = "auto") -> Union[ContextTower, DenoiserTower]:
    """``source``: ``builtin``, ``preset:NAME`` or a checkpoint directory (torch backend, in
    ``dtype``, ``auto`` = the checkpoint's), or a build directory (onnxruntime, tensorrt: the
    graphs' dtype, and caches of the build's context length, which their shapes fix)."""
    if tower not in TOWER_GROUPS:
        raise ValueError(f"unknown tower {tower!r}; choose one of {', '.join(TOWER_GROUPS)}")
    if backend == "torch":
        from ..reference.sources import open_source
        weights = None if dtype == "auto" else dtype
        if source.startswith("preset:"):
            model_source = open_source(None, source.split(":", 1)[1], weights, device)
        else:
            model_source = open_source(None if source == "builtin" else Path(source), None,
                                       weights, device, device, towers=(tower,))
        opened = backends.open_torch(model_source, max_context)
        head = (model_source.model.context_lm_head if tower == "context"
                else model_source.model.lm_head)
        dtype_of_caches = head.weight.dtype
    elif backend in ("onnxruntime", "tensorrt"):
        opened = (backends.open_onnxruntime(Path(source)) if backend == "onnxruntime" else
                  backends.open_tensorrt(Path(source), device, device, towers=(tower,)))
        if max_context > opened.max_context:
            raise ValueError(f"max_context {max_context} exceeds the {opened.max_context} "
                             f"positions {source} was built for")
        max_context, dtype_of_caches = opened.max_context, opened.dtype
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of "
                         f"{', '.join(backends.BACKENDS)}")
    if tower == "context":
        return ContextTower(opened.context, opened.config, max_context, dtype_of_caches, capacity)
    return DenoiserTower(opened.denoiser, opened.config, max_context, dtype_of_caches, capacity,
                         fused_unmask=opened.fused_unmask)


def source_config(source: str, backend: str) -> TwoTowerConfig:
    """The configuration behind a repository's ``source`` without loading weights (the
    orchestrator needs the vocabulary size and the special ids)."""
    from ..config import preset
    from ..reference.sources import BUILTIN_PRESET, builtin_checkpoint

    if backend != "torch":
        from ..manifest import Manifest
        return Manifest.load(Path(source)).config
    if source.startswith("preset:"):
        return preset(source.split(":", 1)[1])
    directory = builtin_checkpoint() if source == "builtin" else Path(source)
    return preset(BUILTIN_PRESET) if directory is None else \
        TwoTowerConfig.load(directory / "config.json")


class HostingError(TwoTowerError, RuntimeError):
    """A model cannot be hosted as the server was started."""


WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def server_grpc_url(argv: list[str]) -> str:
    """The gRPC endpoint of the tritonserver whose command line is ``argv``, as a client on
    this machine reaches it (a wildcard address becomes loopback)."""
    flags, pending = {}, None
    for arg in argv:
        if pending is not None:
            flags[pending], pending = arg, None
        elif arg.startswith(("--grpc-", "--allow-grpc")):
            name, sep, value = arg.partition("=")
            flags[name] = value
            pending = None if sep else name
    if flags.get("--allow-grpc", "true").lower() in ("false", "0", "off", "no"):
        raise HostingError("the ensemble model streams from twotower_bls over gRPC: start "
                           "tritonserver with gRPC enabled")
    address = flags.get("--grpc-address", "0.0.0.0")
    address = WILDCARDS.get(address, address)
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{flags.get('--grpc-port', '8001')}"
