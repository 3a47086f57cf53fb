"""The in-process engine on a CUDA GPU, as the 60B model runs it there: the step scheduler, the
slot pools on the GPU and the reference executors. Requests of every mode and setting sharing
rounds get the CPU engine's tokens, and a denoiser step's logits stay on the GPU (only the ids
and confidences chosen from them reach the host).

Run on a GPU host:  pytest -m gpu tests/runtime/test_engine_gpu.py
"""

import copy

import pytest
import torch

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.cache import StepCache
from trt_twotower.runtime.rows import Request
from trt_twotower.runtime.scheduler import SchedulerLimits
from trt_twotower.runtime.session import TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MAX_CONTEXT = 96
MIXED = [GenerationSettings(mode="ar", max_new_tokens=24, stop_at_eos=False),
         GenerationSettings(mode="ar", max_new_tokens=17, temperature=0.8, top_k=50, seed=3),
         GenerationSettings(max_new_tokens=32, confidence_threshold=0.5, stop_at_eos=False),
         GenerationSettings(max_new_tokens=16, block_size=8, steps_per_block=8,
                            temperature=0.7, seed=11, stop_at_eos=False),
         GenerationSettings(max_new_tokens=32, forced_commits=4, stop_at_eos=False),
         GenerationSettings(mode="mock-ar", max_new_tokens=20, stop_at_eos=False)]


def _exact_float32() -> None:
    """fp32 as the CPU computes it: no TF32 in matrix products or convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _tokens(model, prompts: list[list[int]]) -> list[list[int]]:
    with TwoTowerSession(TorchContextExecutor(model), TorchDenoiserExecutor(model),
                         model.config, MAX_CONTEXT,
                         limits=SchedulerLimits(capacity=len(prompts))) as session:
        handles = [session.submit(Request(prompt, settings))
                   for prompt, settings in zip(prompts, MIXED * 2)]
        return [handle.result().tokens for handle in handles]


def test_the_engine_on_a_gpu_gives_the_cpu_engines_tokens(tiny_model):
    _exact_float32()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, tiny_model.config.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 30, (2 * len(MIXED),), generator=gen)]
    on_cpu = _tokens(tiny_model, prompts)
    on_gpu = _tokens(copy.deepcopy(tiny_model).to("cuda"), prompts)
    assert all(len(tokens) >= 16 for tokens in on_cpu)
    assert on_gpu == on_cpu


def test_a_denoiser_steps_logits_stay_on_the_gpu(tiny_model):
    model = copy.deepcopy(tiny_model).to("cuda")
    config = model.config
    cache = StepCache.allocate(config, 2, MAX_CONTEXT, torch.float32, "cuda")
    TorchContextExecutor(model).context_step(torch.randint(4, config.vocab_size, (2, 5)), cache)
    block = torch.full((2, 8), config.mask_token_id)
    logits = TorchDenoiserExecutor(model).denoiser_step(block, torch.ones(2), cache)
    assert logits.device.type == "cuda" and logits.shape == (2, 8, config.vocab_size)
