"""``trt-twotower serve`` and ``trt-twotower client``: Triton Inference Server and its client."""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path
from typing import Optional

import click

from ..policy import MODES, GenerationError, GenerationSettings


def served_source(build_dir: Optional[Path], checkpoint: Optional[Path],
                  preset_name: Optional[str], backend: str) -> tuple[str, Path]:
    """The tower models' ``source`` value and the tokenizer folder for the serve options."""
    from ..reference.sources import BUILTIN_CHECKPOINT, builtin_checkpoint

    if backend != "torch" and build_dir is None:
        raise click.UsageError(f"the {backend} backend serves a BUILD_DIR from `convert`/`build`")
    source = (str(build_dir) if backend != "torch" else
              str(checkpoint) if checkpoint else f"preset:{preset_name}" if preset_name else
              "builtin")
    return source, build_dir or checkpoint or (builtin_checkpoint() or BUILTIN_CHECKPOINT.parent)


def served_context(build_dir: Optional[Path], backend: str, asked: Optional[int]) -> int:
    """Graphs and engines fix the cache length: serve at most what the build holds."""
    if backend == "torch":
        return asked or 2048
    from ..export.convert import ExportError, load_manifest
    try:
        built = int(load_manifest(build_dir)["max_context"])
    except ExportError as err:
        raise click.ClickException(str(err)) from None
    if asked is not None and asked > built:
        raise click.UsageError(f"--max-context {asked} exceeds the {built} positions "
                               f"{build_dir} was built for")
    return asked or built


@click.command("serve")
@click.argument("build_dir", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Serve this checkpoint with the PyTorch backend.")
@click.option("--preset", "preset_name", help="Serve random weights of a preset.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
              default="torch", show_default=True,
              help="onnxruntime serves BUILD_DIR's converted graphs, tensorrt its engines.")
@click.option("--context-device", default="cpu", show_default=True,
              help="cpu or cuda:N: where the context_tower model runs.")
@click.option("--denoiser-device", default="cpu", show_default=True,
              help="cpu or cuda:N: where the denoiser_tower model runs (cuda:1 on two GPUs).")
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--max-context", type=int, help="Longest prompt + max_tokens served [default: "
              "2048 for torch; the build's context length for onnxruntime and tensorrt].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True,
              help="torch backend: weights and caches (auto = the checkpoint's).")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--block-sizes", default="16", show_default=True,
              help="Block sizes requests may use (the denoiser was trained on 16).")
@click.option("--capacity", type=int, default=64, show_default=True,
              help="Requests served at once (each tower's sequence slots); more wait.")
@click.option("--bls-instances", type=int, default=1, show_default=True,
              help="Instances of the orchestrator model (each runs requests on threads).")
@click.option("--cpu-threads", type=int, help="PyTorch threads per tower process [default: "
              "the CPU's cores split between the towers placed on it; 0 = PyTorch's default].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the rendered repository and server log go (default: temporary).")
def serve_command(build_dir: Optional[Path], checkpoint: Optional[Path],
                  preset_name: Optional[str], backend: str, context_device: str,
                  denoiser_device: str, address: str, grpc_port: int, http_port: int,
                  metrics_port: int, max_context: Optional[int], dtype: str, max_tokens: int,
                  block_sizes: str,
                  capacity: int, bls_instances: int, cpu_threads: Optional[int],
                  work_dir: Optional[Path]) -> None:
    """Render the model repository for a model and run a real tritonserver until Ctrl-C."""
    from ..serve.repository import RepositoryError, render, repository_values
    from ..serve.server import ServerError, TritonServer

    source, tokenizer_dir = served_source(build_dir, checkpoint, preset_name, backend)
    max_context = served_context(build_dir, backend, max_context)
    work = Path(work_dir or tempfile.mkdtemp(prefix="trt-twotower-serve-"))
    try:
        repo = render(work / "model_repository", repository_values(
            source, backend, tokenizer_dir, context_device, denoiser_device, max_context,
            max_tokens, block_sizes, capacity, bls_instances, dtype, cpu_threads))
        server = TritonServer(repo, work, address, grpc_port, http_port, metrics_port).start()
    except (RepositoryError, ServerError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {address}:{http_port} "
               f"(model 'ensemble'; log {work / 'tritonserver.log'}). Ctrl-C stops it.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if server.process.poll() is not None:
            raise click.ClickException(f"tritonserver exited ({server.process.returncode})")
    click.echo(f"stopping… exit code {server.stop()}")


@click.command("client")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="gRPC endpoint.")
@click.option("--prompt", required=True)
@click.option("--mode", type=click.Choice(MODES), default="diffusion", show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--steps-per-block", type=int, default=16, show_default=True)
@click.option("--confidence-threshold", type=float,
              default=GenerationSettings.confidence_threshold, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stream", is_flag=True, help="Print each committed block as it arrives.")
@click.option("--timeout", type=float, default=120.0, show_default=True)
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
    stats = {}
    try:
        click.echo(prompt, nl=False)
        for ids, text, response_stats in stream_generate(url, prompt, settings, stream, timeout):
            click.echo(text, nl=False)
            stats = response_stats or stats
    except ClientError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"\n[{stats}]", err=True)
