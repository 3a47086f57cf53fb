"""The built-in model report's measurements: the bootstrap interval brackets the accuracy ratio
and narrows as prompts are added (so the report's ± is a real sampling error), and the batched
likelihood and left-to-right probe equal their one-prompt-at-a-time definitions."""

import importlib.util
from pathlib import Path

import torch

from trt_twotower.reference.init import initialise
from trt_twotower.reference.model import TwoTowerModel
from trt_twotower.train.recipe import TOY_CONFIG

_SCRIPT = Path(__file__).resolve().parents[2] / "build_scripts" / "report_builtin.py"
_spec = importlib.util.spec_from_file_location("report_builtin", _SCRIPT)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _guesses(truths, hit_rate, seed):
    """Rows that equal ``truths`` at a random ``hit_rate`` of positions and miss elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    hits = torch.rand(truths.shape, generator=gen) < hit_rate
    return torch.where(hits, truths, truths + 1000).tolist()


def test_the_interval_brackets_the_ratio_and_narrows_with_more_prompts():
    widths = []
    for prompts in (64, 1024):
        truths = torch.randint(4, 50, (prompts, 16), generator=torch.Generator().manual_seed(0))
        ours, ar = _guesses(truths, 0.10, seed=1), _guesses(truths, 0.14, seed=2)
        ratio = report.accuracy(ours, truths.tolist()) / report.accuracy(ar, truths.tolist())
        low, high = report.ratio_interval(ours, ar, truths.tolist())
        assert low < ratio < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert high < 1.0  # with 1024 prompts, 10 % vs 14 % accuracy is told apart


def test_batched_likelihood_equals_scoring_each_prompt_alone():
    """Tolerance 1e-5 per token: batching changes only the order of float sums."""
    model = initialise(TwoTowerModel(TOY_CONFIG), 0).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 1000, (n,), generator=gen).tolist() for n in (5, 5, 7, 5)]
    outputs = [torch.randint(4, 1000, (k,), generator=gen).tolist() for k in (3, 3, 3, 4)]
    alone = []
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logp = torch.log_softmax(model.context_logits(ids[:, :-1], model.new_cache(1)), -1)
        alone.append(logp[0, len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None]).sum())
    expected = float(sum(alone)) / sum(map(len, outputs))
    assert abs(report.likelihood_under_ar(model, prompts, outputs) - expected) < 1e-5
    assert expected < -1.0  # random weights: far from certain, so a wrong slice would show


def test_left_to_right_probe_equals_predicting_each_token_alone():
    """Exact equality of per-position accuracies with one-row, one-position predictions: the
    batched probe must hide position j and everything after it, show everything before it,
    and align AR's shifted logits with it. Truths mix both towers' own guesses with random
    tokens, so both accuracies sit strictly between 0 and 1 and any misalignment shows."""
    model = initialise(TwoTowerModel(TOY_CONFIG), 0).eval()
    width, mask = 8, TOY_CONFIG.mask_token_id

    @torch.no_grad()
    def ar_guess(prompt, known):
        ids = torch.tensor([prompt + known])
        return int(model.context_logits(ids, model.new_cache(1))[0, -1].argmax())

    @torch.no_grad()
    def denoiser_guess(prompt, known):
        cache = model.new_cache(1)
        model.context_step(torch.tensor([prompt]), cache)
        probe = torch.tensor([known + [mask] * (width - len(known))])
        t = torch.tensor([(width - len(known)) / width])
        return int(model.denoiser_step(probe, t, cache)[0, len(known)].argmax())

    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(4, 1000, (6, 7), generator=gen).tolist()
    truths = []
    for prompt in prompts:
        truth = []
        for _ in range(width):
            pick = int(torch.randint(0, 3, (1,), generator=gen))
            truth.append(ar_guess(prompt, truth) if pick == 0 else
                         denoiser_guess(prompt, truth) if pick == 1 else
                         int(torch.randint(4, 1000, (1,), generator=gen)))
        truths.append(truth)

    def accuracy_per_position(guess):
        return [sum(guess(p, t[:j]) == t[j] for p, t in zip(prompts, truths)) / len(prompts)
                for j in range(width)]

    expected_ar = accuracy_per_position(ar_guess)
    expected_den = accuracy_per_position(denoiser_guess)
    assert 0 < sum(expected_ar) / width < 1 and 0 < sum(expected_den) / width < 1
    ar, den = report.left_to_right_skill(model, prompts, truths)
    assert [round(a, 6) for a in ar] == [round(a, 6) for a in expected_ar]
    assert [round(d, 6) for d in den] == [round(d, 6) for d in expected_den]
