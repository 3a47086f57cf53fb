"""How far legitimate reduced-precision computations drift from the reference, relative to the
reference's own drift: the measurement behind ``precision_parity.MULTIPLE`` and ``TOP1_SLACK``.

    OMP_NUM_THREADS=1 python bench/bf16_drift.py --out bench/results/bf16-drift.md

On the built-in model, for each seed and block size, every step of ``parity.run_steps`` is run
by the fp32 reference, the reference in bf16 (or fp16) and one variant. A legitimate variant is
another correct way to compute the model in that dtype: its divergence from either reference,
over the references' divergence from each other, is a ratio a correct engine can reach, and the
criterion's multiple must sit above the largest one measured. The broken variants (executors
with real bugs, which tests/runtime/test_parity_criterion.py also uses) show how far above it
bugs land on the same inputs. KL ratios are square-rooted (KL is quadratic in the log-prob
error) so that all ratios are in log-prob units.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trt_twotower import names, policy  # noqa: E402
from trt_twotower.policy import MODES, GenerationSettings  # noqa: E402
from trt_twotower.reference.attention import Attention  # noqa: E402
from trt_twotower.reference.mamba2 import Mamba2Mixer  # noqa: E402
from trt_twotower.reference.model import FP32_PARAMETERS, TwoTowerModel  # noqa: E402
from trt_twotower.reference.sources import open_source  # noqa: E402
from trt_twotower.runtime.cache import StepCache  # noqa: E402
from trt_twotower.runtime.parity import (REDUCED_BATCH, Backend,  # noqa: E402
                                         compare_generation_reduced, compare_steps_reduced,
                                         run_steps)
from trt_twotower.runtime.precision_parity import (TOP_K, Divergence,  # noqa: E402
                                                   DriftCriterion)
from trt_twotower.runtime.torch_executor import (TorchContextExecutor,  # noqa: E402
                                                 TorchDenoiserExecutor)

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_CONTEXT = 96
BLOCK_SIZES = (8, 16)


# --- legitimate variants ---------------------------------------------------------------------

def torch_backend(model: TwoTowerModel, cache_dtype: torch.dtype) -> Backend:
    return Backend(TorchContextExecutor(model), TorchDenoiserExecutor(model), cache_dtype)


def _rounded_weights(model: TwoTowerModel, dtype: torch.dtype) -> TwoTowerModel:
    """An fp32 copy whose weights hold only ``dtype``'s values (the spec's fp32 ones kept)."""
    copied = copy.deepcopy(model)
    for name, tensor in [*copied.named_parameters(), *copied.named_buffers()]:
        if tensor.is_floating_point() and not name.endswith(FP32_PARAMETERS):
            tensor.data = tensor.data.to(dtype).float()
    return copied


def _cache_outputs_hook(dtype: torch.dtype) -> Callable:
    """Mixer outputs that land in the cache (new K and V, the conv state) leave in ``dtype``,
    as the runtime's cache stores them; the fp32 SSM state stays fp32."""
    def hook(module: torch.nn.Module, _inputs: tuple, out: tuple) -> tuple:
        if isinstance(module, Mamba2Mixer):
            return out[0], out[1].to(dtype), out[2]
        return out[0], out[1].to(dtype), out[2].to(dtype)
    return hook


def fp32_math_model(model: TwoTowerModel, dtype: torch.dtype) -> TwoTowerModel:
    """fp32 arithmetic on ``dtype`` weights; only the cache is in ``dtype``: the fewest
    roundings an engine in that dtype can do."""
    copied = _rounded_weights(model, dtype)
    for tower in (copied.context_tower, copied.denoiser_tower):
        for block in tower.layers:
            if isinstance(block.mixer, (Attention, Mamba2Mixer)):
                block.mixer.register_forward_hook(_cache_outputs_hook(dtype))
    return copied


def fused_rounding_model(model: TwoTowerModel, dtype: torch.dtype) -> TwoTowerModel:
    """fp32 arithmetic inside each layer, ``dtype`` at every layer boundary: weights, the
    embeddings, each block's normed input and mixer output, the new keys and values, the time
    modulation and the final norm are rounded to ``dtype``; what a fused engine does (fp32
    accumulation and softmax inside a kernel, fewer intermediate roundings than eager bf16)."""
    copied = fp32_math_model(model, dtype)

    def rounded(_module: torch.nn.Module, _inputs: tuple, out):
        if isinstance(out, tuple):
            return (out[0].to(dtype).float(), *out[1:])
        return out.to(dtype).float()

    boundaries = [copied.t_block]
    for tower in (copied.context_tower, copied.denoiser_tower):
        boundaries += [tower.embeddings, tower.norm_f]
        for block in tower.layers:
            boundaries += [block.norm, block.mixer]
            if isinstance(block.mixer, Attention):
                boundaries += [block.mixer.k_proj, block.mixer.v_proj]
    for module in boundaries:
        module.register_forward_hook(rounded)
    return copied


def chunk_size_model(model: TwoTowerModel, chunk_size: int) -> TwoTowerModel:
    """The same weights with another SSD chunk size: another order of the fp32 scan."""
    copied = copy.deepcopy(model)
    config = copied.config.replace(chunk_size=chunk_size)
    copied.config = config
    for module in copied.modules():
        if isinstance(module, Mamba2Mixer):
            module.config = config
    return copied


class RowsAlone:
    """Executors that run each batch row on its own: another batch composition."""

    def __init__(self, context: TorchContextExecutor, denoiser: TorchDenoiserExecutor) -> None:
        self.context, self.denoiser = context, denoiser
        self.device = context.device

    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        return torch.cat([self.context.context_step(input_ids[r:r + 1], cache.row(r))
                          for r in range(cache.batch)])

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        return torch.cat([self.denoiser.denoiser_step(block_ids[r:r + 1], t[r:r + 1],
                                                      cache.row(r))
                          for r in range(cache.batch)])

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        return torch.cat([self.denoiser.mock_ar_step(token_ids[r:r + 1], cache.row(r))
                          for r in range(cache.batch)])


class UnmaskingDenoiser:
    """A torch denoiser with the fused greedy unmask step the graph backends have: its own
    logits through the decoding policy."""

    def __init__(self, denoiser: TorchDenoiserExecutor, mask_token_id: int) -> None:
        self.inner, self.mask_token_id = denoiser, mask_token_id
        self.device = denoiser.device

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        return self.inner.denoiser_step(block_ids, t, cache)

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        return self.inner.mock_ar_step(token_ids, cache)

    def denoiser_unmask_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache,
                             threshold: float, steps_left: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.denoiser_step(block_ids, t, cache)
        pred, conf = policy.diffusion_predictions(logits, self.mask_token_id)
        nxt, conf = policy.commit_step(block_ids, pred, conf, self.mask_token_id, threshold,
                                       steps_left)
        return nxt, conf, (nxt == self.mask_token_id).sum(-1)


def legitimate_variants(model: TwoTowerModel, reduced: TwoTowerModel, dtype: torch.dtype
                        ) -> dict[str, Backend]:
    """``model`` is the fp32 reference, ``reduced`` the same in ``dtype``."""
    chunk = model.config.chunk_size
    rows_alone = RowsAlone(TorchContextExecutor(reduced), TorchDenoiserExecutor(reduced))
    return {
        "fused rounding": torch_backend(fused_rounding_model(model, dtype), dtype),
        "fp32 math": torch_backend(fp32_math_model(model, dtype), dtype),
        f"SSD chunk {chunk // 2}": torch_backend(chunk_size_model(reduced, chunk // 2), dtype),
        "rows alone": Backend(rows_alone, rows_alone, dtype),
    }


# --- broken variants: executors with real bugs ------------------------------------------------

def kv_heads_swapped(model: TwoTowerModel) -> TwoTowerModel:
    """KV heads 0 and 1 trade places in the context tower's first attention layer."""
    broken = copy.deepcopy(model)
    attention = broken.context_tower.layers[broken.config.attention_layers[0]].mixer
    d = broken.config.head_dim
    rows = attention.k_proj.weight.shape[0]
    order = torch.cat([torch.arange(d, 2 * d), torch.arange(d), torch.arange(2 * d, rows)])
    for proj in (attention.k_proj, attention.v_proj):
        proj.weight.data = proj.weight.data[order]
    return broken


class MambaStateDroppedAtCommit:
    """A context executor that loses one Mamba layer's conv and SSM state before extending a
    non-empty cache by a block, as if the state were not carried across the block boundary."""

    def __init__(self, inner: TorchContextExecutor, layer: int) -> None:
        self.inner, self.layer = inner, layer
        self.device = inner.device

    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        if input_ids.shape[1] > 1 and int(cache.lengths.max()) > 0:
            cache.tensors[names.conv_state(self.layer)].zero_()
            cache.tensors[names.ssm_state(self.layer)].zero_()
        return self.inner.context_step(input_ids, cache)


class ContextReadOneOff:
    """A denoiser that reads the context's keys and values one position late: positions
    1..L (the last one never written) instead of 0..L−1."""

    def __init__(self, inner: TorchDenoiserExecutor) -> None:
        self.inner = inner
        self.device = inner.device

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        tensors = dict(cache.tensors)
        for name in cache.kv_names():
            kv = cache.tensors[name]
            tensors[name] = torch.cat([kv[:, :, 1:], torch.zeros_like(kv[:, :, :1])], dim=2)
        return self.inner.denoiser_step(block_ids, t, StepCache(tensors, cache.lengths,
                                                                cache.max_context))

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        return self.inner.mock_ar_step(token_ids, cache)


def broken_variants(reduced: TwoTowerModel, dtype: torch.dtype) -> dict[str, Backend]:
    """The reference in ``dtype`` with one bug each."""
    context, denoiser = TorchContextExecutor(reduced), TorchDenoiserExecutor(reduced)
    mask_token_id = reduced.config.mask_token_id
    return {
        "KV heads swapped": torch_backend(kv_heads_swapped(reduced), dtype),
        "Mamba state dropped at commit": Backend(
            MambaStateDroppedAtCommit(context, reduced.config.mamba_layers[0]), denoiser, dtype),
        "context read one position late": Backend(context, ContextReadOneOff(denoiser), dtype),
        "unmask with mask id + 1": Backend(context, UnmaskingDenoiser(denoiser,
                                                                      mask_token_id + 1), dtype),
    }


# --- measurement -----------------------------------------------------------------------------

def with_unmask(backend: Backend, mask_token_id: int) -> Backend:
    """The backend with a fused unmask step, so that the criterion's unmask row runs too."""
    if hasattr(backend.denoiser, "denoiser_unmask_step"):
        return backend
    return Backend(backend.context, UnmaskingDenoiser(backend.denoiser, mask_token_id),
                   backend.dtype)


def raw_ratios(drift: Divergence, d: Divergence) -> dict[str, float]:
    """A divergence over the references' own, without the criterion's floor, in log-prob units
    (KL square-rooted): at the median position (what the criterion bounds) and at the worst."""
    return {"median": max(d.logprob_median / drift.logprob_median,
                          math.sqrt(d.kl_median / drift.kl_median)),
            "max": max(d.logprob_max / drift.logprob_max, math.sqrt(d.kl_max / drift.kl_max))}


def measure(variant: Backend, reference: Backend, reference_fp32: Backend, config,
            seeds: range) -> dict[str, float]:
    """Over seeds and block sizes: the largest ratios (median and worst position, against
    either reference), pooled top-1 deficit, step statistic over its bound and unexplained
    unmask tokens; the smallest per-run largest statistic over its bound (how weakly the
    variant fails, if it does); and the fraction of runs the criterion rejects."""
    found: dict[str, float] = {"weakest run": math.inf, "runs rejected": 0.0}
    runs = 0

    def keep(key: str, value: float) -> None:
        found[key] = max(found.get(key, 0.0), value)

    for seed in seeds:
        for block_size in BLOCK_SIZES:
            report = compare_steps_reduced(reference, reference_fp32,
                                           with_unmask(variant, config.mask_token_id), config,
                                           MAX_CONTEXT, block_size, seed=seed)
            for row in report.steps:
                for against, d in (("dtype", row.vs_reference), ("fp32", row.vs_fp32)):
                    for name, ratio in raw_ratios(row.drift, d).items():
                        keep(f"{name} vs {against}", ratio)
                keep("criterion", row.worst)
            keep("top-1 deficit", report.reference_top1 - report.candidate_top1)
            keep("unmask unexplained", report.unmask.max_abs)
            found["weakest run"] = min(found["weakest run"], max(r.worst for r in report.steps))
            found["runs rejected"] += bool(report.failures())
            runs += 1
    found["runs rejected"] /= runs
    return found


def head_and_tail(reference: Backend, reference_fp32: Backend, config) -> tuple[float, float]:
    """Why the log-prob error is read over the reference's top-k: on seed 0, block 16, the
    median position's full-vocabulary error over its top-k error, and the median log p of the
    token where the full-vocabulary error is largest."""
    steps, _ = run_steps([reference_fp32, reference], config, MAX_CONTEXT, 16,
                         batch=REDUCED_BATCH)
    full, head, where = [], [], []
    for step in steps:
        ref, other = (torch.log_softmax(t.double().reshape(-1, t.shape[-1]), -1)
                      for t in step.logits)
        error = (other - ref).abs()
        full.append(error.amax(-1))
        head.append(error.gather(-1, ref.topk(TOP_K, -1).indices).amax(-1))
        where.append(ref.gather(-1, error.argmax(-1, keepdim=True)).squeeze(-1))
    return (float(torch.cat(full).median() / torch.cat(head).median()),
            float(torch.cat(where).median()))


def generation_agreement(variant: Backend, reference: Backend, reference_fp32: Backend, config,
                         seeds: range) -> dict[str, list[tuple[float, float]]]:
    """Per mode, per prompt set: greedy token agreement with fp32 of the variant and of the
    reference in its dtype (three prompts of 1, 6 and 11 tokens, 32 new tokens, block 16)."""
    settings = [GenerationSettings(mode=m, max_new_tokens=32, block_size=16, steps_per_block=16,
                                   stop_at_eos=False) for m in MODES]
    found: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(4, config.vocab_size, (n,), generator=gen).tolist()
                   for n in (1, 6, 11)]
        for row in compare_generation_reduced(reference, reference_fp32, variant, config,
                                              MAX_CONTEXT, prompts, settings):
            found[row.mode].append((row.agreement_fp32, row.reference_agreement))
    return found


COLUMNS = ["median vs dtype", "median vs fp32", "max vs dtype", "max vs fp32", "top-1 deficit",
           "criterion", "weakest run", "runs rejected", "unmask unexplained"]


def table_row(dtype_name: str, kind: str, name: str, found: dict[str, float]) -> str:
    return (f"| {dtype_name} | {kind} | {name} | "
            + " | ".join(f"{found[c]:.3f}" for c in COLUMNS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0..N-1 of the inputs")
    parser.add_argument("--generation-seeds", type=int, default=6,
                        help="prompt sets 0..N-1 for the generation agreement table")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fp32 = open_source(dtype="float32")
    config = fp32.config
    reference_fp32 = torch_backend(fp32.model, torch.float32)
    lines = ["| dtype | kind | variant | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(COLUMNS)]
    largest = {"median": 0.0, "max": 0.0, "top-1 deficit": 0.0}
    generations = ["| dtype | mode | fused rounding vs fp32 | reference vs fp32 |",
                   "|---|---|---|---|"]
    tails = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPE_NAMES[dtype_name]
        reduced = open_source(dtype=dtype_name).model
        reference = torch_backend(reduced, dtype)
        legitimate = legitimate_variants(fp32.model, reduced, dtype)
        ratio, log_p = head_and_tail(reference, reference_fp32, config)
        tails.append(f"{dtype_name}: the full-vocabulary error is {ratio:.1f}x the top-{TOP_K} "
                     f"error at the median position, and the token it comes from has a median "
                     f"log p of {log_p:.1f}.")
        agreement = generation_agreement(legitimate["fused rounding"], reference, reference_fp32,
                                         config, range(args.generation_seeds))
        for mode, pairs in agreement.items():
            generations.append(f"| {dtype_name} | {mode} | " + " | ".join(
                f"{min(p[i] for p in pairs):.2f} to {max(p[i] for p in pairs):.2f}"
                for i in (0, 1)) + " |")
        for name, variant in legitimate.items():
            found = measure(variant, reference, reference_fp32, config, range(args.seeds))
            for key in largest:
                largest[key] = max([largest[key]] + [v for k, v in found.items()
                                                     if k.startswith(key)])
            lines.append(table_row(dtype_name, "legitimate", name, found))
            print(lines[-1], flush=True)
        if dtype == torch.bfloat16:
            for name, variant in broken_variants(reduced, dtype).items():
                found = measure(variant, reference, reference_fp32, config, range(args.seeds))
                lines.append(table_row(dtype_name, "broken", name, found))
                print(lines[-1], flush=True)
    criterion = DriftCriterion.for_dtype(torch.bfloat16)
    text = "\n".join([
        "# Drift of reduced-precision computations, relative to the reference's own",
        "",
        f"Command: `OMP_NUM_THREADS=1 python bench/bf16_drift.py --seeds {args.seeds} "
        f"--generation-seeds {args.generation_seeds} --dtypes {args.dtypes} --out "
        f"bench/results/bf16-drift.md` (built-in model, CPU; "
        f"`parity.compare_steps_reduced`: batch {REDUCED_BATCH}, prefills 1/7/13, block sizes "
        f"{'/'.join(map(str, BLOCK_SIZES))}, seeds 0 to {args.seeds - 1}; broken variants in "
        "bf16 only).",
        "",
        "Ratio columns: the variant's divergence from the reference in its dtype (*vs dtype*) "
        "or from the fp32 reference (*vs fp32*) over the two references' divergence from each "
        "other on the same inputs, the larger of the log-prob error ratio and the square root "
        "of the KL ratio, at the step's median position (*median*, what the criterion bounds) "
        "and at its worst position (*max*, reported only); the largest over every step, seed "
        "and block size. *top-1 deficit*: the reference's pooled top-1 agreement with fp32 "
        "minus the variant's, largest over runs. *criterion*: the largest bounded statistic "
        f"over its bound under `DriftCriterion` (multiple {criterion.multiple:g}, floor = the "
        "dtype's unit roundoff; below 1 passes), largest over steps and runs; *weakest run*: "
        "the same, largest over a run's steps, smallest over runs. *runs rejected*: the "
        "fraction of runs the criterion fails (top-1 and unmask included). *unmask "
        "unexplained*: the most fused-unmask tokens that no backend's logits commit (every "
        "variant gets the policy's unmask over its own logits, except the one with the wrong "
        "mask id).",
        "",
        *lines,
        "",
        f"Largest median-position ratio of a legitimate variant: **{largest['median']:.2f}**; "
        f"the criterion's multiple is {criterion.multiple:g} "
        f"({criterion.multiple / largest['median']:.2f}x that). Largest worst-position ratio: "
        f"{largest['max']:.1f} (not bounded: see docs/parity-criterion.md). Largest pooled "
        f"top-1 deficit: {largest['top-1 deficit']:.3f}; the criterion allows "
        f"{criterion.top1_slack:g}.",
        "",
        f"Top-{TOP_K} against the full vocabulary (seed 0, block 16, reference vs fp32): "
        + " ".join(tails),
        "",
        "## Greedy generations",
        "",
        f"Token agreement with the fp32 reference, lowest to highest over {args.generation_seeds} "
        "prompt sets (three prompts of 1, 6 and 11 random tokens, 32 new tokens, block 16), of "
        "the fused-rounding variant and of the reference in the same dtype (why these are "
        "reported, not gated: docs/parity-criterion.md).",
        "",
        *generations,
    ])
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
