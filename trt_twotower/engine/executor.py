"""TensorRT engines as tower executors (GPU hosts only).

The session's caches live in CUDA memory on each engine's device; inputs and outputs are bound
by address. The context engine's KV-cache outputs are bound to the very buffers of its cache
inputs (TensorRT's KV-cache update writes in place); the Mamba states come back in scratch
buffers and are copied over. Each optimisation profile has its own execution context, chosen
by the step's token count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import names
from ..config import TwoTowerConfig
from ..runtime.cache import StepCache
from ..runtime.executor import BackendUnavailable
from .flavor import FlavorError, find_flavor
from .manifest import ManifestError, validate_engines

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Engine:
    """One deserialised engine with an execution context per optimisation profile."""

    def __init__(self, trt: Any, path: Path, device: torch.device, profiles: dict[str, dict]
                 ) -> None:
        self.device, self.profiles, self.path = device, profiles, path
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise BackendUnavailable(f"TensorRT could not deserialise {path}; rebuild it "
                                         "on this host's TensorRT")
            self.stream = torch.cuda.Stream(device)
            self.contexts = {}
            for index, name in enumerate(profiles):
                context = self.engine.create_execution_context()
                context.set_optimization_profile_async(index, self.stream.cuda_stream)
                self.contexts[name] = context

    def run(self, profile: str, feeds: dict[str, torch.Tensor],
            bound_outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Execute with ``feeds``; outputs not in ``bound_outputs`` are allocated here."""
        context = self.contexts[profile]
        feeds = {name: tensor.contiguous() for name, tensor in feeds.items()}
        self._check_shapes(profile, feeds)
        with torch.cuda.device(self.device):
            for name, tensor in feeds.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = dict(bound_outputs)
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                if name in feeds or name in outputs:
                    continue
                shape = tuple(context.get_tensor_shape(name))
                dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            for name, tensor in outputs.items():
                context.set_tensor_address(name, tensor.data_ptr())
            torch.cuda.current_stream(self.device).synchronize()
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed (profile {profile})")
            self.stream.synchronize()
        return outputs

    def _check_shapes(self, profile: str, feeds: dict[str, torch.Tensor]) -> None:
        """A readable error where TensorRT would only say the shape is out of range."""
        for name, (lo, _, hi) in self.profiles[profile].items():
            shape = list(feeds[name].shape)
            if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
                raise ValueError(
                    f"{self.path.name} ({profile} profile) takes {name} from {lo} to {hi}, got "
                    f"{shape}: rebuild with a larger --max-batch/--max-prefill or the session's "
                    "--block-size")


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    return {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
            "INT64": torch.int64, "INT32": torch.int32, "BOOL": torch.bool}[trt_dtype.name]


def _feeds(cache: StepCache) -> dict[str, torch.Tensor]:
    return {"past_length": cache.lengths, **cache.tensors}


class TrtContextExecutor:
    def __init__(self, engine: _Engine, config: TwoTowerConfig, block_size: int,
                 max_prefill: int) -> None:
        self.engine, self.config, self.device = engine, config, engine.device
        self.block_size, self.max_prefill = block_size, max_prefill

    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """Long prompts go through the prefill profile in chunks of ``max_prefill``."""
        cache.check_room(input_ids.shape[1])
        logits = None
        for start in range(0, input_ids.shape[1], self.max_prefill):
            logits = self._step(input_ids[:, start:start + self.max_prefill], cache)
        return logits

    def _step(self, ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        tokens = ids.shape[1]
        profile = ("decode" if tokens == 1 else "block" if tokens == self.block_size
                   else "prefill")
        bound = {}
        for i in self.config.attention_layers:
            bound[names.present_key(i)] = cache.tensors[names.past_key(i)]
            bound[names.present_value(i)] = cache.tensors[names.past_value(i)]
        out = self.engine.run(profile, {"input_ids": ids.to(self.device, torch.int64),
                                        **_feeds(cache)}, bound)
        for i in self.config.mamba_layers:
            cache.tensors[names.conv_state(i)].copy_(out[names.new_conv_state(i)])
            cache.tensors[names.ssm_state(i)].copy_(out[names.new_ssm_state(i)])
        cache.lengths += tokens
        return out["logits"].float().cpu()


class TrtDenoiserExecutor:
    def __init__(self, engines: dict[str, _Engine]) -> None:
        self.engines = engines
        self.device = engines[names.DENOISER_STEP].device

    def _engine(self, graph: str) -> _Engine:
        if graph not in self.engines:
            raise BackendUnavailable(f"this build has no {graph} engine: build it with "
                                     f"`trt-twotower build --graph {graph}` (or all graphs)")
        return self.engines[graph]

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        out = self._engine(names.DENOISER_STEP).run("block", {
            "block_ids": block_ids.to(self.device, torch.int64),
            "t": t.to(self.device, torch.float32), **_feeds(cache)}, {})
        return out["logits"].float().cpu()

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        out = self._engine(names.MOCK_AR_STEP).run("mock-ar", {
            "block_ids": token_ids.to(self.device, torch.int64), **_feeds(cache)}, {})
        return out["logits"][:, -1].float().cpu()

    def denoiser_unmask_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache,
                             threshold: float, steps_left: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self._engine(names.DENOISER_UNMASK_STEP).run("block", {
            "block_ids": block_ids.to(self.device, torch.int64),
            "t": t.to(self.device, torch.float32),
            "confidence_threshold": torch.tensor(threshold, device=self.device),
            "steps_left": torch.tensor(steps_left, dtype=torch.int64, device=self.device),
            **_feeds(cache)}, {})
        return (out["next_block"].cpu(), out["confidence"].cpu(), out["masked_count"].cpu())


def open_engines(build_dir: Path, context_device: str, denoiser_device: str,
                 towers: tuple[str, ...] = ("context", "denoiser")) -> Any:
    """Validate the manifest against this host's TensorRT, then load the context engine on
    ``context_device`` and the denoiser's on ``denoiser_device`` (the manifest's devices are
    the build's intent; the caller decides where they run). A tower left out of ``towers``
    loads no engine (a Triton tower model holds one tower on its own GPU); its executor is
    None."""
    from ..runtime.backends import OpenBackend
    from ..tokenizer import load_tokenizer

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT engines run on a GPU host with TensorRT; this "
                                 "machine has no CUDA GPU (inspect the build with "
                                 "`trt-twotower inspect`)")
    try:
        manifest = validate_engines(Path(build_dir))
        built_with = {e["flavor"] for e in manifest["engines"].values()}
        flavor = find_flavor(built_with.pop() if len(built_with) == 1 else "auto")
        manifest = validate_engines(Path(build_dir), flavor.name, flavor.version)
    except FlavorError as err:
        raise BackendUnavailable(f"the tensorrt backend needs a GPU and the TensorRT that "
                                 f"built {build_dir}: {err}") from err
    except ManifestError as err:  # callers handle BackendUnavailable; the message says why
        raise BackendUnavailable(str(err)) from err
    missing = {names.CONTEXT_STEP, names.DENOISER_STEP} - set(manifest["engines"])
    if missing:
        raise BackendUnavailable(f"{build_dir} has no {', '.join(sorted(missing))} engine: "
                                 "rebuild with every graph")
    if manifest.get("lowering") == "plugin":
        from .plugins import register_plugins
        register_plugins(flavor.module)
    config = TwoTowerConfig.from_dict(manifest["config"])
    devices = {names.CONTEXT_STEP: torch.device(context_device)}
    loaded = {}
    for graph, record in manifest["engines"].items():
        if ("context" if graph == names.CONTEXT_STEP else "denoiser") not in towers:
            continue
        device = devices.get(graph, torch.device(denoiser_device))
        loaded[graph] = _Engine(flavor.module, Path(build_dir) / record["file"], device,
                                record["profiles"])
    build = manifest["build"]
    context = (TrtContextExecutor(loaded[names.CONTEXT_STEP], config, build["block_size"],
                                  build["max_prefill"]) if "context" in towers else None)
    denoiser = TrtDenoiserExecutor(loaded) if "denoiser" in towers else None
    return OpenBackend("tensorrt", context, denoiser, config, load_tokenizer(build_dir),
                       manifest["max_context"], TORCH_DTYPES[manifest["dtype"]],
                       fused_unmask=names.DENOISER_UNMASK_STEP in loaded)
