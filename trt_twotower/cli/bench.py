"""``trt-twotower bench``: AR vs diffusion throughput on one backend and device."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from pathlib import Path
from typing import Optional

import click

from ..policy import GenerationError, GenerationSettings
from ..runtime.backends import BACKENDS
from .options import (INT32_COUNT, SEED, created_dir, Device, dtype_option, model_source_options,
                      NumberList, token_budget_option)

COUNTS = NumberList(int, 1, 2**31 - 1)


def check_settings(thresholds: tuple[float, ...], block_sizes: tuple[int, ...],
                   steps: tuple[int, ...], forced: tuple[int, ...], max_new_tokens: int) -> None:
    """Every diffusion setting of the sweep can run, checked before the model loads: a bad
    combination would otherwise fail after the sweep's first cases have run."""
    try:
        for size, t in itertools.product(block_sizes, steps):
            for gamma in thresholds:
                GenerationSettings(max_new_tokens=max_new_tokens, block_size=size,
                                   steps_per_block=t, confidence_threshold=gamma)
            for k in forced:
                GenerationSettings(max_new_tokens=max_new_tokens, block_size=size,
                                   steps_per_block=t, forced_commits=k)
    except GenerationError as err:
        raise click.UsageError(str(err)) from None


def held_out_prompts(tokenizer, count: int, length: int, vocab: int, seed: int
                     ) -> list[list[int]]:
    """Prompts from held-out Python source when the corpus is there, else random ids."""
    import torch
    try:
        from ..train.corpus import read_texts
        texts = read_texts("heldout", max_files=count * 4)
        prompts = [ids[:length] for ids in (tokenizer.encode(t) for t in texts)
                   if len(ids) >= length]
        if len(prompts) >= count:
            return prompts[:count]
    except (ImportError, OSError, ValueError):
        pass
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (count, length), generator=gen).tolist()


@click.command("bench")
@model_source_options
@click.option("--backend", type=click.Choice(BACKENDS[:2]), default="torch", show_default=True)
@click.option("--build-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="onnxruntime: converted graphs (default: convert into a temporary dir).")
@click.option("--thresholds", type=NumberList(float, 0.0, 1.0), default="0.5,0.7,0.8,0.9,0.95",
              show_default=True, help="Confidence thresholds γ to sweep (comma-separated).")
@click.option("--block-sizes", type=COUNTS, default="16", show_default=True)
@click.option("--steps-per-block", "steps", type=COUNTS, default="16", show_default=True)
@click.option("--batch-sizes", type=COUNTS, default="1,4", show_default=True)
@click.option("--forced-commits", type=NumberList(int, 1, 2**31 - 1, allow_empty=True),
              default="", help="Also run diffusion committing exactly K tokens per denoiser "
              "step, for each K (comma-separated).")
@token_budget_option(64, "Tokens per request.")
@click.option("--prompt-length", type=INT32_COUNT, default=32, show_default=True)
@click.option("--device", type=Device(), default="cpu", show_default=True)
@dtype_option()
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--load", is_flag=True, help="Instead: the in-process engine under load, "
              "closed-loop --clients and Poisson --rates, for diffusion (first threshold), "
              "diffusion with the first --forced-commits K and AR on the same engine; "
              "writes OUT/load.md, OUT/load.csv and OUT/load.png.")
@click.option("--serve", is_flag=True, help="Instead: --load on the in-process engine and on "
              "a real tritonserver (gRPC streaming clients), each load on one then the other, "
              "with Triton's tokens/s ratio and tower bytes per token.")
@click.option("--clients", type=COUNTS, default="1,4,16,64", show_default=True,
              help="--serve, --load: numbers of concurrent clients.")
@click.option("--rates", type=NumberList(float, 1e-3, 1e6), default="4,16", show_default=True,
              help="--load, --serve: Poisson arrival rates (requests/s).")
@click.option("--requests-per-client", type=click.IntRange(min=1), default=2,
              show_default=True,
              help="--load, --serve: requests each closed-loop client sends in turn (longer "
                   "runs weigh less on the ramp-up and the tail); Poisson loads send twice "
                   "the largest --clients.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="--load, --serve: runs of each load per path, the paths taking turns; "
                   "the table keeps each path's median run.")
@click.option("--cpu-threads", type=click.IntRange(min=1),
              help="--load, --serve: PyTorch threads of the in-process engine and of each "
                   "Triton tower, the same for both so that the paths compare like with like "
                   "[default with --serve: the cores split between the two towers, as `serve` "
                   "does; otherwise PyTorch's default].")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-out"), show_default=True,
              help="Folder for bench.csv and bench.png.")
def bench_command(checkpoint: Optional[Path], preset_name: Optional[str], backend: str,
                  build_dir: Optional[Path], thresholds: tuple[float, ...],
                  block_sizes: tuple[int, ...], steps: tuple[int, ...],
                  batch_sizes: tuple[int, ...], forced_commits: tuple[int, ...],
                  max_new_tokens: int, prompt_length: int, device: str, dtype: str, seed: int,
                  serve: bool, load: bool, clients: tuple[int, ...],
                  rates: tuple[float, ...], requests_per_client: int, repeats: int,
                  cpu_threads: Optional[int], out: Path) -> None:
    """Tokens/s of mask diffusion against AR on the same backend and device, sweeping γ,
    block size, steps per block and batch size; distinct MoE experts per denoiser step
    (torch backend). Prints a table, writes OUT/bench.csv and OUT/bench.png.

    With --load: output tokens/s, requests/s and first-block / inter-block latencies of the
    in-process engine under closed-loop clients and Poisson arrivals; writes OUT/load.md.
    With --serve: the same on the in-process engine and through Triton, with Triton's
    tokens/s ratio and the bytes crossing process boundaries per token."""
    from ..runtime.benchmark import format_rows, plot, sweep, write_csv
    from ..runtime.heap import keep_freed_memory
    from .generate import check_length, open_backend

    check_settings(thresholds, block_sizes, steps, forced_commits, max_new_tokens)
    created_dir(out, "--out")
    if serve and load:
        raise click.UsageError("give --serve or --load, not both")
    if serve and device != "cpu":
        raise click.UsageError("--serve compares on the CPU here; serve GPUs with "
                               "`trt-twotower serve --context-device/--denoiser-device`")
    keep_freed_memory()  # the engines measured here reuse their steps' memory, as served ones do
    if load or serve:
        return _load_bench(checkpoint, preset_name, backend, build_dir, dtype, device,
                           list(clients), list(rates), prompt_length, max_new_tokens,
                           thresholds[0], forced_commits[0] if forced_commits else 4, seed,
                           serve, requests_per_client, repeats, cpu_threads, out)
    batches = list(batch_sizes)
    with tempfile.TemporaryDirectory(prefix="trt-twotower-") as scratch:
        opened = open_backend(backend, checkpoint, preset_name, build_dir, dtype, device,
                              device, Path(scratch))
        longest = prompt_length + max_new_tokens
        check_length(prompt_length, max_new_tokens,
                     opened.max_context or opened.config.max_position_embeddings)
        if not opened.max_context:
            opened.max_context = longest
        pool = held_out_prompts(opened.tokenizer, max(batches), prompt_length,
                                opened.config.vocab_size, seed)
        model = opened.context.model if backend == "torch" else None
        rows = sweep(opened, lambda b: pool[:b], batches, thresholds, block_sizes, steps,
                     max_new_tokens, forced_commits, model=model)
    click.echo(format_rows(rows))
    click.echo(f"\nwrote {write_csv(rows, out / 'bench.csv')} and {plot(rows, out / 'bench.png')}")


def _load_bench(checkpoint: Optional[Path], preset_name: Optional[str], backend: str,
                build_dir: Optional[Path], dtype: str, device: str, clients: list[int],
                rates: list[float], prompt_length: int, max_new_tokens: int, gamma: float,
                forced: int, seed: int, serve: bool, requests_per_client: int,
                repeats: int, cpu_threads: Optional[int], out: Path) -> None:
    """Each case on its own warmed engine, every load in turn (runtime/load_benchmark.py);
    with ``serve`` each load also through one Triton server that serves every case, its
    towers with as many PyTorch threads as the in-process engine."""
    import csv

    import torch

    from ..serve.repository import tower_threads

    from ..runtime.load_benchmark import SessionTarget, format_load, plot_load, run_load
    from ..runtime.scheduler import SchedulerLimits
    from ..runtime.session import TwoTowerSession
    from .generate import check_length, open_backend

    cases = [(f"diffusion γ {gamma:g}", GenerationSettings(
                 max_new_tokens=max_new_tokens, confidence_threshold=gamma, seed=seed,
                 stop_at_eos=False)),
             (f"diffusion K={forced}", GenerationSettings(
                 max_new_tokens=max_new_tokens, forced_commits=forced, seed=seed,
                 stop_at_eos=False)),
             ("AR", GenerationSettings(mode="ar", max_new_tokens=max_new_tokens, seed=seed,
                                       stop_at_eos=False))]
    if serve and cpu_threads is None:
        cpu_threads = tower_threads("cpu", "cpu", None)
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    with tempfile.TemporaryDirectory(prefix="trt-twotower-") as scratch, \
            contextlib.ExitStack() as stack:
        opened = open_backend(backend, checkpoint, preset_name, build_dir, dtype, device,
                              device, Path(scratch))
        check_length(prompt_length, max_new_tokens,
                     opened.max_context or opened.config.max_position_embeddings)
        max_context = opened.max_context or prompt_length + max_new_tokens
        prompts = held_out_prompts(opened.tokenizer, max(clients), prompt_length,
                                   opened.config.vocab_size, seed)

        @contextlib.contextmanager
        def engine():
            with TwoTowerSession(opened.context, opened.denoiser, opened.config,
                                 max_context, opened.dtype, opened.fused_unmask,
                                 SchedulerLimits(capacity=max(clients))) as session:
                yield SessionTarget(session)

        targets = [engine]
        if serve:
            targets.append(stack.enter_context(_served(
                checkpoint, preset_name, build_dir, backend, dtype, max_context, max_new_tokens,
                max(clients), cpu_threads, Path(scratch))))
        rows = run_load(targets, prompts, cases, clients, rates,
                        requests_per_client=requests_per_client,
                        poisson_requests=2 * max(clients), repeats=repeats,
                        progress=lambda row: click.echo(
                            f"  {row.path}, {row.label}, {row.load}: "
                            f"{row.record()['tokens_per_s']} tok/s"))
    table = format_load(rows)
    click.echo(table)
    (out / "load.md").write_text(table + "\n")
    with open(out / "load.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].record()))
        writer.writeheader()
        writer.writerows(row.record() for row in rows)
    click.echo(f"\nwrote {out / 'load.md'}, {out / 'load.csv'} and "
               f"{plot_load(rows, out / 'load.png')}")


@contextlib.contextmanager
def _served(checkpoint: Optional[Path], preset_name: Optional[str],
            build_dir: Optional[Path], backend: str, dtype: str, max_context: int,
            max_new_tokens: int, capacity: int, cpu_threads: int, scratch: Path):
    """A tritonserver for the same model on the CPU; yields a factory of its load target."""
    from ..serve.load_target import TritonTarget
    from ..serve.repository import render, repository_values
    from ..serve.server import ServerError, TritonServer
    from .serve import served_source

    source, tokenizer_dir = served_source(build_dir, checkpoint, preset_name, backend)
    repo = render(scratch / "repo", repository_values(
        source, backend, tokenizer_dir, "cpu", "cpu", max_context, max_new_tokens,
        str(GenerationSettings().block_size), capacity=capacity, dtype=dtype,
        cpu_threads=cpu_threads))
    try:
        server = TritonServer(repo, scratch).start()
    except ServerError as err:
        raise click.ClickException(str(err)) from None
    target = TritonTarget(server.grpc_url)
    try:
        yield lambda: target
    finally:
        server.stop()
