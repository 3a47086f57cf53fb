"""The load benchmark's bookkeeping: percentiles, closed-loop and Poisson runs that send every
request once and time each block."""

import numpy as np
import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.load_benchmark import (SessionTarget, closed_loop, format_load,
                                                 percentile, plot_load, poisson)
from trt_twotower.runtime.session import TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor


@pytest.mark.parametrize("q", [0, 37, 50, 99, 100])
def test_percentile_matches_numpys_linear_rule(q):
    values = list(np.random.default_rng(3).exponential(size=41))
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], q) is None


def test_closed_loop_and_poisson_runs_send_every_request_and_time_each_block(tiny_model,
                                                                           tmp_path):
    settings = GenerationSettings(max_new_tokens=8, block_size=4, steps_per_block=4,
                                  stop_at_eos=False)
    prompts = [[5, 6, 7], [8, 9]]
    with TwoTowerSession(TorchContextExecutor(tiny_model), TorchDenoiserExecutor(tiny_model),
                         tiny_model.config, 32) as session:
        target = SessionTarget(session)
        loop = closed_loop(target, prompts, settings, clients=3, total=7, label="diffusion")
        arrivals = poisson(target, prompts, settings, rate=200.0, total=5, label="diffusion")
    assert loop.requests == 7 and loop.tokens == 7 * 8
    assert len(loop.first_block) == 7 and len(loop.gaps) == 7  # two blocks: one gap each
    assert arrivals.requests == 5 and arrivals.tokens == 5 * 8
    assert all(v > 0 for v in loop.first_block + loop.gaps)
    assert plot_load([loop, arrivals], tmp_path / "load.png").stat().st_size > 1000
    table = format_load([loop, arrivals])
    assert "| diffusion | 3 clients | 7 |" in table and "Poisson 200/s" in table
