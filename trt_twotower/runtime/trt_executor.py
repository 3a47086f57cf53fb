"""TensorRT engines as tower executors (GPU hosts only).

One engine per tower holds the tower's weights once; its step types are optimisation profiles
(context: decode, block, prefill; denoiser: block, mock-ar). Each profile has an execution
context, and all of an engine's contexts share one activation buffer sized for the largest
profile: they run one at a time, in order, on the device's current stream.

The session's caches live in CUDA memory on each engine's device; inputs and outputs are bound
by address after their devices and dtypes are checked. The context engine's KV-cache outputs
are bound to the very buffers of its cache inputs (TensorRT's KV-cache update writes in place);
the Mamba states come back in scratch buffers and are copied over. Work is queued on torch's
current stream of the engine's device with no host synchronisation, so the two GPUs overlap;
a result is waited for only where the host reads it.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import torch

from .. import names
from ..config import TwoTowerConfig
from ..manifest import EngineRecord, Manifest, ManifestError, TensorRecord
from .cache import StepCache
from .executor import BackendUnavailable, OpenBackend
from .feeds import context_feeds, denoiser_feeds

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "int64": torch.int64, "bool": torch.bool}
TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                "INT64": torch.int64, "INT32": torch.int32, "BOOL": torch.bool}


class FeedError(ValueError):
    """A tensor handed to an engine on the wrong device, in the wrong dtype or shape."""


def check_feeds(engine_name: str, device: torch.device, inputs: tuple[TensorRecord, ...],
                feeds: dict[str, torch.Tensor]) -> None:
    """Every input the engine declares is fed, on the engine's own device, in its dtype: an
    address of another GPU's memory would be read as garbage, not refused, by the engine."""
    for spec in inputs:
        if spec.name not in feeds:
            raise FeedError(f"{engine_name}: input {spec.name} was not fed")
        tensor = feeds[spec.name]
        if tensor.device != device:
            raise FeedError(f"{engine_name} runs on {device} but {spec.name} is on "
                            f"{tensor.device}: copy it to the engine's device first (the "
                            "session mirrors the context cache onto the denoiser's device)")
        if tensor.dtype != TORCH_DTYPES[spec.dtype]:
            raise FeedError(f"{engine_name}: {spec.name} must be {spec.dtype}, got "
                            f"{str(tensor.dtype).removeprefix('torch.')}")


class _Engine:
    """One deserialised engine, a context per profile, one shared activation buffer."""

    def __init__(self, trt: Any, path: Path, device: torch.device, record: EngineRecord
                 ) -> None:
        self.device, self.path, self.record = device, path, record
        self.profiles = record.profiles
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                self.engine = self.runtime.deserialize_cuda_engine(m)
            if self.engine is None:
                raise BackendUnavailable(f"TensorRT could not deserialise {path}; rebuild it "
                                         "on this host's TensorRT")
            size = self.engine.device_memory_size_v2
            self.activations = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
            stream = torch.cuda.current_stream(device).cuda_stream
            self.contexts = {}
            for index, name in enumerate(self.profiles):
                context = self.engine.create_execution_context(
                    trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                context.set_device_memory(self.activations.data_ptr(), size)
                context.set_optimization_profile_async(index, stream)
                self.contexts[name] = context

    def run(self, profile: str, feeds: dict[str, torch.Tensor],
            bound_outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Queue one execution with ``feeds``; outputs not in ``bound_outputs`` are allocated
        here. Returns without waiting for the GPU."""
        context = self.contexts[profile]
        feeds = {name: tensor.contiguous() for name, tensor in feeds.items()}
        check_feeds(self.path.name, self.device, self.record.inputs, feeds)
        check_shapes(self.path.name, profile, self.profiles[profile], feeds)
        with torch.cuda.device(self.device):
            for spec in self.record.inputs:
                context.set_input_shape(spec.name, tuple(feeds[spec.name].shape))
                context.set_tensor_address(spec.name, feeds[spec.name].data_ptr())
            outputs = dict(bound_outputs)
            for spec in self.record.outputs:
                if spec.name not in outputs:
                    shape = tuple(context.get_tensor_shape(spec.name))
                    dtype = TRT_TO_TORCH[self.engine.get_tensor_dtype(spec.name).name]
                    outputs[spec.name] = torch.empty(shape, dtype=dtype, device=self.device)
                context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            stream = torch.cuda.current_stream(self.device).cuda_stream
            if not context.execute_async_v3(stream):
                raise RuntimeError(f"TensorRT execution of {self.path.name} failed (profile "
                                   f"{profile})")
        return outputs


def check_shapes(engine_name: str, profile: str, ranges: dict[str, tuple],
                 feeds: dict[str, torch.Tensor]) -> None:
    """A readable error where TensorRT would only say the shape is out of range."""
    for name, (lo, _, hi) in ranges.items():
        shape = list(feeds[name].shape)
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            raise FeedError(
                f"{engine_name} ({profile} profile) takes {name} from {list(lo)} to "
                f"{list(hi)}, got {shape}: rebuild with a larger --max-batch/--max-prefill or "
                "the session's --block-size")


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
        return logits.float()

    def _step(self, ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        tokens = ids.shape[1]
        profile = ("decode" if tokens == 1 else "block" if tokens == self.block_size
                   else "prefill")
        bound = {}
        for i in self.config.attention_layers:
            bound[names.present_key(i)] = cache.tensors[names.past_key(i)]
            bound[names.present_value(i)] = cache.tensors[names.past_value(i)]
        out = self.engine.run(profile, context_feeds(ids, cache), bound)
        for i in self.config.mamba_layers:
            cache.tensors[names.conv_state(i)].copy_(out[names.new_conv_state(i)])
            cache.tensors[names.ssm_state(i)].copy_(out[names.new_ssm_state(i)])
        cache.lengths += tokens
        return out["logits"]


class TrtDenoiserExecutor:
    """The denoiser engine: block steps and the fused unmask step in its "block" profile,
    mock-AR (unmodulated, one token) in its "mock-ar" profile."""

    def __init__(self, engine: _Engine) -> None:
        self.engine, self.device = engine, engine.device

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        out = self.engine.run("block", denoiser_feeds(block_ids, t, True, cache), {})
        return out["logits"].float()

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        t = torch.zeros(token_ids.shape[0])
        out = self.engine.run("mock-ar", denoiser_feeds(token_ids, t, False, cache), {})
        return out["logits"][:, -1].float()

    def denoiser_unmask_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache,
                             threshold: float | torch.Tensor, steps_left: int | torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.engine.run("block", denoiser_feeds(block_ids, t, True, cache, threshold,
                                                      steps_left), {})
        return (out["next_block"].cpu(), out["confidence"].cpu(), out["masked_count"].cpu())


def open_engines(build_dir: Path, context_device: str, denoiser_device: str,
                 towers: tuple[str, ...] = ("context", "denoiser")) -> OpenBackend:
    """Load the engines of ``towers`` (context on ``context_device``, denoiser on
    ``denoiser_device``; the manifest's devices are the build's intent, the caller decides
    where they run) after verifying them once, and only them, against this host's TensorRT.
    A tower left out loads no engine (a Triton tower model holds one tower on its own GPU);
    its executor is None."""
    from ..engine.flavor import FlavorError, find_flavor
    from ..engine.verify import engines_of, verify_engines
    from ..tokenizer import load_tokenizer

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT engines run on a GPU host with TensorRT; this "
                                 "machine has no CUDA GPU (inspect the build with "
                                 "`trt-twotower inspect`)")
    try:
        manifest = Manifest.load(Path(build_dir))
        built_with = {r.flavor for r in engines_of(manifest, towers).values()}
        flavor = find_flavor(built_with.pop() if len(built_with) == 1 else "auto")
        records = verify_engines(Path(build_dir), manifest, towers, flavor.name,
                                 flavor.version)
    except FlavorError as err:
        raise BackendUnavailable(f"the tensorrt backend needs a GPU and the TensorRT that "
                                 f"built {build_dir}: {err}") from err
    except ManifestError as err:  # callers handle BackendUnavailable; the message says why
        raise BackendUnavailable(str(err)) from err
    if manifest.uses_plugin_ops:
        from ..engine.plugins import register_plugins
        register_plugins(flavor.module)
    devices = {"context": torch.device(context_device),
               "denoiser": torch.device(denoiser_device)}
    loaded = {tower: _Engine(flavor.module, Path(build_dir) / record.file, devices[tower],
                             record) for tower, record in records.items()}
    build = manifest.build
    context = (TrtContextExecutor(loaded["context"], manifest.config, build.block_size,
                                  build.max_prefill) if "context" in loaded else None)
    denoiser = TrtDenoiserExecutor(loaded["denoiser"]) if "denoiser" in loaded else None
    return OpenBackend("tensorrt", context, denoiser, manifest.config,
                       load_tokenizer(build_dir), manifest.max_context,
                       TORCH_DTYPES[manifest.dtype], fused_unmask=denoiser is not None)
