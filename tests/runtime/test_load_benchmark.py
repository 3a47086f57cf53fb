"""The load benchmark's bookkeeping: percentiles, closed-loop and Poisson runs that send every
request once and time each block."""

import numpy as np
import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.load_benchmark import (SessionTarget, closed_loop, format_load,
                                                 median_run, percentile, plot_load, poisson,
                                                 run_load)
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


def test_repeated_loads_keep_each_paths_median_run_and_its_ratio(tiny_model):
    """Two in-process engines stand for two paths; with three turns each, a path's row is the
    run with its median tokens/s among the three reported, and the ratio is of those two."""
    import contextlib

    settings = GenerationSettings(max_new_tokens=4, block_size=4, steps_per_block=2,
                                  stop_at_eos=False)

    def engine(name):
        @contextlib.contextmanager
        def opened():
            with TwoTowerSession(TorchContextExecutor(tiny_model),
                                 TorchDenoiserExecutor(tiny_model), tiny_model.config,
                                 32) as session:
                target = SessionTarget(session)
                target.name = name
                yield target
        return opened
    reported = []
    rows = run_load([engine("in-process"), engine("other")], [[5, 6, 7]],
                    [("diffusion", settings)], [2], [], requests_per_client=2,
                    poisson_requests=2, progress=reported.append, repeats=3)
    assert [r.path for r in reported] == ["in-process", "other"] * 3
    assert [r.path for r in rows] == ["in-process", "other"]
    for row in rows:
        speeds = sorted(r.tokens_per_second for r in reported if r.path == row.path)
        assert row.tokens_per_second == speeds[1] and row in reported
    assert rows[1].ratio == pytest.approx(rows[1].tokens_per_second /
                                          rows[0].tokens_per_second)
    assert median_run(reported[:2]).tokens_per_second == min(
        r.tokens_per_second for r in reported[:2])
