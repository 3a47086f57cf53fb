"""``trt-twotower serve`` and ``trt-twotower client``: Triton Inference Server and its client."""

from __future__ import annotations

import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import click

from ..config import PRESETS
from ..policy import MODES, GenerationError, GenerationSettings
from ..serve.repository import STREAM_INTERVAL
from .options import (Dtype, INT32_COUNT, SEED, Device, NumberList, PositiveNumber, created_dir,
                      utf8_text)
from .resolve import one_source

if TYPE_CHECKING:
    from ..serve.server import TritonServer
    from ..serve.supervisor import Supervisor

PORT = click.IntRange(0, 65535)  # 0: any free port


def served_source(build_dir: Optional[Path], checkpoint: Optional[Path],
                  preset_name: Optional[str], backend: str) -> tuple[str, Path]:
    """The tower models' ``source`` value and the tokenizer folder for the serve options."""
    from ..reference.sources import BUILTIN_CHECKPOINT, builtin_checkpoint

    one_source(checkpoint, preset_name)
    if backend != "torch" and build_dir is None:
        raise click.UsageError(f"the {backend} backend serves a BUILD_DIR from `convert`/`build`")
    if backend != "torch" and (checkpoint or preset_name):
        raise click.UsageError(f"the {backend} backend serves BUILD_DIR's model: drop "
                               "--checkpoint/--preset (they are for the torch backend)")
    if backend == "torch" and build_dir is not None:
        raise click.UsageError("BUILD_DIR is served by --backend onnxruntime or tensorrt; the "
                               "torch backend serves --checkpoint, --preset or the built-in model")
    source = (str(build_dir) if backend != "torch" else
              str(checkpoint) if checkpoint else f"preset:{preset_name}" if preset_name else
              "builtin")
    return source, build_dir or checkpoint or (builtin_checkpoint() or BUILTIN_CHECKPOINT.parent)


def served_context(build_dir: Optional[Path], backend: str, asked: Optional[int]) -> int:
    """Graphs and engines fix the cache length: serve at most what the build holds. The
    tensorrt backend needs both towers' engines, checked here before a server starts."""
    if backend == "torch":
        return asked or 2048
    from ..manifest import Manifest

    manifest = Manifest.load(build_dir)
    if backend == "tensorrt":
        for tower in ("context", "denoiser"):
            manifest.engine_of(tower)
    built = manifest.max_context
    if asked is not None and asked > built:
        raise click.UsageError(f"--max-context {asked} exceeds the {built} positions "
                               f"{build_dir} was built for")
    return asked or built


def check_address(address: str) -> None:
    """An address this machine cannot listen on fails inside tritonserver; try it here."""
    try:
        family = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family) as probe:
            probe.bind((address, 0))
    except OSError as err:
        raise click.BadParameter(f"cannot listen on {address}: {err.strerror or err}; use "
                                 "127.0.0.1 or an address of this machine",
                                 param_hint="--address") from None


def check_ports(*ports: int) -> None:
    """Two servers on one port: refuse before starting any."""
    chosen = [p for p in ports if p]
    if len(set(chosen)) < len(chosen):
        raise click.UsageError(f"--grpc-port, --http-port, --metrics-port and --openai-port "
                               f"must differ (got {', '.join(map(str, ports))}); 0 picks a "
                               "free port")


def usable_work_dir(work_dir: Optional[Path]) -> Path:
    """The work directory, created now so that a path that cannot hold the repository and log
    is refused before anything starts (default: a new temporary one)."""
    if work_dir is None:
        return Path(tempfile.mkdtemp(prefix="trt-twotower-serve-"))
    return created_dir(work_dir, "--work-dir")


@click.command("serve")
@click.argument("build_dir", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Serve this checkpoint with the PyTorch backend.")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
              help="Serve random weights of a preset.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
              default="torch", show_default=True,
              help="onnxruntime serves BUILD_DIR's converted graphs, tensorrt its engines.")
@click.option("--context-device", type=Device(), default="cpu", show_default=True,
              help="cpu or cuda:N: where the context_tower model runs.")
@click.option("--denoiser-device", type=Device(), default="cpu", show_default=True,
              help="cpu or cuda:N: where the denoiser_tower model runs (cuda:1 on two GPUs).")
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--grpc-port", type=PORT, default=8001, show_default=True)
@click.option("--http-port", type=PORT, default=8000, show_default=True)
@click.option("--metrics-port", type=PORT, default=8002, show_default=True)
@click.option("--max-context", type=INT32_COUNT,
              help="Longest prompt + max_tokens served [default: 2048 for torch; the build's "
                   "context length for onnxruntime and tensorrt].")
@click.option("--dtype", type=Dtype(("auto", "float32", "bfloat16", "float16")),
              default="auto", show_default=True,
              help="torch backend: weights and caches (auto = the checkpoint's).")
@click.option("--max-tokens", type=INT32_COUNT, default=512, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--block-sizes", type=NumberList(int, 1, 2**31 - 1), default="16",
              show_default=True,
              help="Block sizes requests may use (the denoiser was trained on 16).")
@click.option("--capacity", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests served at once (each tower's sequence slots); more wait.")
@click.option("--bls-instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of the orchestrator model (each runs one step loop over its "
                   "share of the capacity).")
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens one scheduler round pushes through the context tower (a "
                   "long prompt takes several rounds and never stalls the others).")
@click.option("--ar-steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="AR tokens a request takes per scheduler round while only AR requests "
                   "run: the context tower feeds each token back itself (fewer calls and "
                   "answers per token).")
@click.option("--stream-interval", type=click.IntRange(min=1), default=STREAM_INTERVAL,
              show_default=True,
              help="Tokens a streamed message carries at least, after a request's first "
                   "(which goes at once); the rest go with the final answer. Larger: fewer "
                   "messages, less CPU per token under load; 1: every step's tokens at once.")
@click.option("--max-waiting", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Requests that may wait for a free slot; past them the server answers "
                   "busy at once.")
@click.option("--cpu-threads", type=click.IntRange(min=0),
              help="PyTorch threads per tower process [default: the CPU's cores split between "
                   "the towers placed on it; 0 = PyTorch's default].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the rendered repository and server log go (default: temporary).")
@click.option("--openai-port", type=PORT, default=9000, show_default=True,
              help="Port of the OpenAI-compatible HTTP API (docs/openai-api.md); 0 = any free.")
@click.option("--no-openai", is_flag=True, help="Do not start the OpenAI-compatible API.")
@click.option("--api-key", envvar="TRT_TWOTOWER_API_KEY",
              help="Bearer token the OpenAI API requires (default: none; env "
                   "TRT_TWOTOWER_API_KEY).")
@click.option("--served-model-name", default="twotower", show_default=True,
              help="The model name the OpenAI API serves and accepts.")
def serve_command(build_dir: Optional[Path], checkpoint: Optional[Path],
                  preset_name: Optional[str], backend: str, context_device: str,
                  denoiser_device: str, address: str, grpc_port: int, http_port: int,
                  metrics_port: int, max_context: Optional[int], dtype: str, max_tokens: int,
                  block_sizes: tuple[int, ...],
                  capacity: int, bls_instances: int, prefill_tokens: int, ar_steps: int,
                  stream_interval: int, max_waiting: int, cpu_threads: Optional[int],
                  work_dir: Optional[Path], openai_port: int, no_openai: bool,
                  api_key: Optional[str], served_model_name: str) -> None:
    """Render the model repository for a model and run a real tritonserver until Ctrl-C,
    restarting it on the same ports whenever one of its processes dies."""
    from ..serve.repository import RepositoryError, render, repository_values
    from ..serve.server import TritonServer
    from ..serve.supervisor import Supervisor

    check_address(address)
    check_ports(grpc_port, http_port, metrics_port, *(() if no_openai else (openai_port,)))
    source, tokenizer_dir = served_source(build_dir, checkpoint, preset_name, backend)
    max_context = served_context(build_dir, backend, max_context)
    work = usable_work_dir(work_dir)
    try:
        repo = render(work / "model_repository", repository_values(
            source, backend, tokenizer_dir, context_device, denoiser_device, max_context,
            max_tokens, ",".join(map(str, block_sizes)), capacity, bls_instances, dtype,
            cpu_threads, prefill_tokens, max_waiting, ar_steps, stream_interval))
    except RepositoryError as err:
        raise click.ClickException(str(err)) from None
    with signals_interrupt():
        server = started(TritonServer(repo, work, address, grpc_port, http_port, metrics_port))
        click.echo(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {address}:"
                   f"{server.http_port} (model 'ensemble'; log {server.log}). Ctrl-C stops it.")
        supervisor = Supervisor(server, report=lambda line: click.echo(line, err=True)).start()
        openai = None
        try:
            if not no_openai:
                openai = _start_openai(server, address, openai_port, tokenizer_dir,
                                       served_model_name, api_key, capacity)
            serve_until_signal(supervisor)
        finally:
            if openai is not None:
                openai.stop()
            code = supervisor.stop()
    click.echo(f"stopping… exit code {code}")


def _start_openai(server: TritonServer, address: str, port: int, tokenizer_dir: Path,
                  model_name: str, api_key: Optional[str], capacity: int):
    """The OpenAI-compatible API beside Triton, over its gRPC endpoint; 503 once the towers'
    ``capacity`` requests are running."""
    from ..serve.openai_api import create_app, run_openai_server
    from ..tokenizer import load_tokenizer

    handle = run_openai_server(create_app(server.grpc_url, model_name,
                                          load_tokenizer(tokenizer_dir), api_key=api_key,
                                          max_in_flight=capacity), address, port)
    click.echo(f"OpenAI API: {handle.url}/v1 (model '{model_name}')")
    return handle


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into ``Interrupted`` while a server runs: their default
    actions end Python without its cleanup, and the server, in a process group of its own,
    would live on as an orphan holding the ports."""
    from ..serve.server import Interrupted

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def started(server: TritonServer) -> TritonServer:
    """Start the server as a one-line error: a failed or interrupted start has already stopped
    what it launched (``TritonServer.start``), so only the cause is left to say."""
    from ..serve.server import Interrupted, ServerError

    try:
        return server.start()
    except ServerError as err:
        raise click.ClickException(str(err)) from None
    except Interrupted as signalled:
        raise click.ClickException(f"stopped by {signalled} while tritonserver was starting; "
                                   "it was stopped too") from None


def serve_until_signal(supervisor: Supervisor) -> None:
    """Serve until a stop signal (a normal end) or until the supervisor gives up restarting
    a server that keeps dying (an error saying why)."""
    from ..serve.server import Interrupted

    try:
        while supervisor.running():
            time.sleep(0.5)
    except Interrupted:
        return
    raise click.ClickException(supervisor.failure or "the tritonserver supervisor stopped")


@click.command("client")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="gRPC endpoint.")
@click.option("--prompt", required=True, callback=utf8_text)
@click.option("--mode", type=click.Choice(MODES), default="diffusion", show_default=True)
@click.option("--max-tokens", "--max-new-tokens", "max_tokens", type=INT32_COUNT, default=64,
              show_default=True, help="Tokens to generate (--max-new-tokens is an alias).")
@click.option("--block-size", type=INT32_COUNT, default=16, show_default=True)
@click.option("--steps-per-block", type=INT32_COUNT, default=16, show_default=True)
@click.option("--confidence-threshold", type=float,
              default=GenerationSettings.confidence_threshold, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--stream", is_flag=True, help="Print each message as it arrives (a committed "
              "block, or a few AR tokens).")
@click.option("--timeout", type=PositiveNumber(), default=120.0, show_default=True,
              help="Seconds to wait for each response; the call ends within it.")
def client_command(url: str, prompt: str, mode: str, max_tokens: int, block_size: int,
                   steps_per_block: int, confidence_threshold: float, temperature: float,
                   seed: int, stream: bool, timeout: float) -> None:
    """Generate through a running `trt-twotower serve` over gRPC."""
    from ..serve.client import ClientError, stream_generate

    try:
        settings = GenerationSettings(mode=mode, max_new_tokens=max_tokens,
                                      block_size=block_size, steps_per_block=steps_per_block,
                                      confidence_threshold=confidence_threshold,
                                      temperature=temperature, seed=seed)
    except GenerationError as err:
        raise click.UsageError(str(err)) from None
    stats: dict = {}
    printed = False
    try:
        for ids, text, response_stats in stream_generate(url, prompt, settings, stream, timeout):
            click.echo(text if printed else prompt + text, nl=False)
            printed = True
            stats = response_stats or stats
    except ClientError:
        if printed:
            click.echo()  # the error goes on a line of its own, after the partial text
        raise
    if not printed:
        click.echo(prompt, nl=False)
    click.echo(f"\n[{stats}]", err=True)
