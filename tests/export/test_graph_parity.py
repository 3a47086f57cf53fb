"""The exported graphs, run by ONNX Runtime, compute what the reference computes (fp32):
every step type within 1e-4 relative and greedy generations token for token."""

import onnx
import pytest
import torch

from trt_twotower import names, policy
from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.cache import StepCache
from trt_twotower.runtime.ort_executor import OrtContextExecutor, OrtDenoiserExecutor
from trt_twotower.runtime.parity import (Backend, compare_generation, compare_steps,
                                         format_table)
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor
from tests.export.conftest import MAX_CONTEXT

TOLERANCE = 1e-4


def _backends(config, model, out, plugin=False):
    return (Backend(TorchContextExecutor(model), TorchDenoiserExecutor(model)),
            Backend(OrtContextExecutor(out, config, plugin), OrtDenoiserExecutor(out, config, plugin)))


def test_graphs_pass_the_checker_with_full_shape_inference(exported):
    _, _, out = exported
    for graph in names.GRAPHS:
        onnx.checker.check_model(str(out / f"{graph}.onnx"), full_check=True)


def test_every_step_type_matches_the_reference(exported):
    config, model, out = exported
    ref, cand = _backends(config, model, out)
    rows = compare_steps(ref, cand, config, MAX_CONTEXT, block_size=8,
                         prefill_lengths=(1, 6, 13), tolerance=TOLERANCE)
    assert all(r.passed for r in rows), format_table(rows)
    assert any(r.step.startswith("denoiser (prefix 0") for r in rows)


def test_greedy_generation_is_identical_in_every_mode(exported):
    """Random weights can leave near-ties between the top two logits; the prompts and seeds
    here were checked to have a top-2 margin far above the 1e-4 logit tolerance."""
    config, model, out = exported
    ref, cand = _backends(config, model, out)
    settings = [GenerationSettings(mode=m, max_new_tokens=16, block_size=8, steps_per_block=8,
                                   stop_at_eos=False) for m in ("diffusion", "mock-ar", "ar")]
    rows = compare_generation(ref, cand, config, MAX_CONTEXT, [[5, 6, 7, 8, 9], [11], [40] * 3],
                              settings, fused_unmask=True)
    assert all(r.passed for r in rows), format_table([], rows)


def test_plugin_lowering_matches_the_reference(exported_plugin):
    """The plugin graph (custom trt_twotower ops run by their torch definitions) computes
    what the reference computes: every step type and every mode."""
    config, model, out = exported_plugin
    graph = onnx.load(str(out / f"{names.DENOISER_STEP}.onnx"), load_external_data=False)
    custom = {n.op_type for n in graph.graph.node if n.domain == "trt_twotower"}
    assert custom == {"BlockCrossAttention", "ConfidenceUnmask"}
    ref, cand = _backends(config, model, out, plugin=True)
    rows = compare_steps(ref, cand, config, MAX_CONTEXT, block_size=8, tolerance=TOLERANCE)
    assert all(r.passed for r in rows), format_table(rows)
    settings = [GenerationSettings(mode=m, max_new_tokens=16, block_size=8, steps_per_block=8,
                                   stop_at_eos=False) for m in ("diffusion", "mock-ar")]
    gens = compare_generation(ref, cand, config, MAX_CONTEXT, [[5, 6, 7], [11]], settings,
                              fused_unmask=True)
    assert all(g.passed for g in gens), format_table([], gens)


def test_rows_of_one_unmask_step_keep_their_own_threshold_and_steps_left(exported):
    """Rows of different requests share a denoiser call: each row commits by its own γ and
    steps left, exactly as the policy does for that row alone."""
    config, model, out = exported
    ref, cand = _backends(config, model, out)
    gen = torch.Generator().manual_seed(7)
    batch, size = 4, 8
    cache = StepCache.allocate(config, batch, MAX_CONTEXT, torch.float32)
    ref.context.context_step(torch.randint(4, config.vocab_size, (batch, 5), generator=gen),
                             cache)
    block = torch.randint(4, config.vocab_size, (batch, size), generator=gen)
    block[torch.rand(block.shape, generator=gen) < 0.7] = config.mask_token_id
    t = block.eq(config.mask_token_id).float().mean(-1)
    gamma, steps = torch.tensor([0.0, 0.3, 0.99, 0.5]), torch.tensor([4, 1, 2, 8])
    nxt, _, _ = cand.denoiser.denoiser_unmask_step(block, t, cache, gamma, steps)
    logits = ref.denoiser.denoiser_step(block, t, cache)
    pred, conf = policy.diffusion_predictions(logits, config.mask_token_id)
    for row in range(batch):
        alone, _ = policy.commit_step(block[row:row + 1], pred[row:row + 1],
                                      conf[row:row + 1], config.mask_token_id,
                                      float(gamma[row]), int(steps[row]))
        assert torch.equal(nxt[row], alone[0]), row
    committed = (nxt != block).sum(-1)
    assert len(set(committed.tolist())) > 1, "the rows should commit different counts"
