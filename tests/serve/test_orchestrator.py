"""The orchestrator's loop over two tower objects, through the very tensors a Triton tower
model receives (``direct_call``): it equals the in-process session, keeps caches only in the
towers, batches every live request into one call per tower and round, and frees a sequence
however its request ends. The towers refuse what only a stray or hostile caller would send."""

import threading
import time

import numpy as np
import pytest
import torch

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.cache import CacheFullError
from trt_twotower.runtime.scheduler import SchedulerLimits
from trt_twotower.runtime.session import Request, TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor
from trt_twotower.runtime.tower_work import (FROM_TOWER, ContextWork, DenoiseGroup,
                                             DenoiserWork, ExtendGroup, MockGroup)
from trt_twotower.serve.bls_link import TowerCallError, TowerCallOutOfOrder, direct_call
from trt_twotower.serve.orchestrator import HeldTokens, Orchestrator
from trt_twotower.serve.repository import CONTEXT_MODEL, DENOISER_MODEL, STREAM_INTERVAL
from trt_twotower.serve.tower_requests import (TowerAccessDenied, encode_context,
                                               encode_denoiser, handle)
from trt_twotower.serve.towers import (CallOutOfOrder, ContextTower, DenoiserTower, SequenceKey,
                                       SlotTable,
                                       TowerBusy, TowerRequestError, UnknownSequence,
                                       settings_from_json, settings_to_json)

MAX_CONTEXT = 80
SECRET = "s3cret"


@pytest.fixture
def towers(tiny_model):
    c = tiny_model.config
    return (ContextTower(TorchContextExecutor(tiny_model), c, MAX_CONTEXT, torch.float32, 8),
            DenoiserTower(TorchDenoiserExecutor(tiny_model), c, MAX_CONTEXT, torch.float32, 8))


class Collect:
    """A streaming responder that keeps what the orchestrator answers."""

    stream = True

    def __init__(self, gone_after_blocks=None):
        self.blocks, self.scores, self.result, self.error = [], [], None, None
        self.tail = None
        self.gone_after = gone_after_blocks
        self.ended = threading.Event()

    def block(self, ids, scores):
        self.blocks.append(ids)
        self.scores.append(scores)

    def finish(self, result, ids, scores):
        self.tail = ids  # the last tokens, not streamed yet
        if ids:
            self.blocks.append(ids)
            self.scores.append(scores)
        self.result = result
        self.ended.set()

    def fail(self, message):
        self.error = message
        self.ended.set()

    def gone(self):
        return self.gone_after is not None and len(self.blocks) >= self.gone_after


def _orchestrator(model, towers, calls=None, capacity=8):
    call = direct_call(*towers, SECRET)

    def counted(name, inputs, outputs):
        if calls is not None:
            calls.append((name, inputs))
        return call(name, inputs, outputs)
    return Orchestrator(counted, SECRET, model.config, MAX_CONTEXT,
                        SchedulerLimits(capacity=capacity), max_waiting=16,
                        stream_interval=STREAM_INTERVAL)


def _mixed(model, rng, count):
    out = []
    for i in range(count):
        mode = ("diffusion", "mock-ar", "ar")[i % 3]
        temperature = (0.0, 0.8)[i % 2]
        s = GenerationSettings(mode=mode, max_new_tokens=8 + 4 * (i % 3), block_size=8,
                               steps_per_block=4 + i % 3, temperature=temperature,
                               top_k=40 if temperature else None,
                               confidence_threshold=(0.3, 0.9)[i % 2], seed=100 + i,
                               stop_at_eos=False)
        prompt = torch.randint(4, model.config.vocab_size, (1 + i % 6,),
                               generator=rng).tolist()
        out.append((prompt, s))
    return out


def _slow_calls(towers, seconds, only=None):
    """Tower calls that each take ``seconds`` more (``only``: that model's calls), and the
    (model, start, end, rows named) of every call, appended as calls end."""
    call = direct_call(*towers, SECRET)
    spans, lock = [], threading.Lock()

    def slow(name, inputs, outputs):
        start = time.monotonic()
        if only in (None, name):
            time.sleep(seconds)
        out = call(name, inputs, outputs)
        rows = {int(i) for key in ("row_id", "mock_id") for i in inputs.get(key, [])}
        with lock:
            spans.append((name, start, time.monotonic(), rows))
        return out
    return slow, spans


def test_a_rounds_two_tower_calls_run_at_once_over_disjoint_rows(tiny_model, towers, rng):
    """The towers live in two processes (two GPUs): a round's context call and denoiser call
    must not wait for each other. Each call here holds its tower for 50 ms; run one after the
    other, no two calls would ever overlap."""
    slow, spans = _slow_calls(towers, 0.05)
    orchestrator = Orchestrator(slow, SECRET, tiny_model.config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    jobs = _mixed(tiny_model, rng, 6)
    collected = [Collect() for _ in jobs]
    for (prompt, s), responder in zip(jobs, collected):
        orchestrator.submit(prompt, s, responder)
    assert all(r.ended.wait(120) for r in collected)
    orchestrator.close(10)
    assert all(r.error is None for r in collected)
    context = [s for s in spans if s[0] == CONTEXT_MODEL and s[3]]
    denoiser = [s for s in spans if s[0] == DENOISER_MODEL and s[3]]
    overlapping = [(c, d) for c in context for d in denoiser if c[1] < d[2] and d[1] < c[2]]
    assert len(overlapping) >= 3, "context and denoiser calls of a round ran one after another"
    for c, d in overlapping:
        assert not c[3] & d[3], "a row was in both towers' calls of one round"


def test_a_long_context_call_does_not_hold_back_the_denoisers_rows(tiny_model, towers, rng):
    """Each tower runs at its own pace: while a context call computes (here every one takes
    0.4 s, as a long prefill would), the denoiser keeps stepping the rows that call does not
    serve. A request arriving mid-way is prefilled during another's denoising; both still get
    their solo tokens. With rounds that wait for both towers, a denoiser call could never lie
    inside a context call."""
    slow, spans = _slow_calls(towers, 0.4, only=CONTEXT_MODEL)
    orchestrator = Orchestrator(slow, SECRET, tiny_model.config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    jobs = [(torch.randint(4, tiny_model.config.vocab_size, (n,), generator=rng).tolist(),
             GenerationSettings(max_new_tokens=16, block_size=8, steps_per_block=8,
                                forced_commits=1, seed=7 + n, stop_at_eos=False))
            for n in (3, 40)]
    collected = [Collect() for _ in jobs]
    orchestrator.submit(*jobs[0], collected[0])
    deadline = time.monotonic() + 60
    while not any(s[0] == DENOISER_MODEL and s[3] for s in list(spans)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    orchestrator.submit(*jobs[1], collected[1])
    assert all(r.ended.wait(120) for r in collected)
    _freed_soon(towers, opened=2)
    orchestrator.close(10)
    for got, alone in zip(collected, _solo(tiny_model, tiny_model.config, jobs)):
        assert got.error is None and got.result.tokens == alone.tokens
    context = [s for s in spans if s[0] == CONTEXT_MODEL and s[3]]
    denoiser = [s for s in spans if s[0] == DENOISER_MODEL and s[3]]
    inside = max(sum(c[1] < d[1] and d[2] < c[2] for d in denoiser) for c in context)
    assert inside >= 3, "the denoiser waited for the context call to finish"


def test_mixed_requests_equal_their_solo_in_process_tokens_and_share_each_call(
        tiny_model, towers, rng):
    jobs = _mixed(tiny_model, rng, 12)
    calls = []
    orchestrator = _orchestrator(tiny_model, towers, calls)
    collected = [Collect() for _ in jobs]
    for (prompt, s), responder in zip(jobs, collected):
        orchestrator.submit(prompt, s, responder)
    assert all(r.ended.wait(120) for r in collected)
    _freed_soon(towers)
    assert all(t.stats()["cache_bytes"] == 0 for t in towers)
    orchestrator.close(10)
    session = TwoTowerSession(TorchContextExecutor(tiny_model),
                              TorchDenoiserExecutor(tiny_model), tiny_model.config, MAX_CONTEXT)
    for (prompt, s), got in zip(jobs, collected):
        expected = session.generate([Request(prompt, s)])[0]
        assert got.error is None and got.result.tokens == expected.tokens
        assert sum(got.blocks, []) == expected.tokens
        assert got.result.stats.denoiser_evals == expected.stats.denoiser_evals
        assert got.result.stats.handoff_bytes == expected.stats.handoff_bytes
        assert got.result.stats.boundary_bytes > got.result.stats.handoff_bytes
    session.close()
    rows = [len(inputs.get("row_id", [])) + len(inputs.get("mock_id", []))
            for name, inputs in calls if name == DENOISER_MODEL]
    # rows pushing a block or token through the context tower sit that round's denoiser call
    # out, so not every diffusion and mock-AR row is in each; one row per call would fail
    assert max(rows) >= 4, "denoiser and mock-AR steps of several requests share one call"


def _freed_soon(towers, opened=None, seconds=2.0):
    """Every sequence opened on ``towers`` (``opened`` of them on each, if given) is released
    within a few rounds of its request ending: the request ends as soon as its last answer is
    taken, its release rides on the next call to each tower (behind any call still under way
    for it). Check it before the orchestrator closes: closing frees whatever is still open."""
    deadline = time.monotonic() + seconds
    while any(t.stats()["live_sequences"] for t in towers) and time.monotonic() < deadline:
        time.sleep(0.01)
    for tower in towers:
        stats = tower.stats()
        assert stats["live_sequences"] == 0 and stats["opened"] == stats["released"]
        assert opened is None or stats["opened"] == opened


def test_a_client_that_goes_away_frees_both_towers_within_a_round(tiny_model, towers):
    orchestrator = _orchestrator(tiny_model, towers)
    s = GenerationSettings(max_new_tokens=64, block_size=8, steps_per_block=8,
                           stop_at_eos=False)
    responder = Collect(gone_after_blocks=1)
    orchestrator.submit([5, 6, 7], s, responder)
    assert responder.ended.wait(60)
    assert responder.result.cancelled and len(responder.result.tokens) < 64
    _freed_soon(towers, opened=1)
    orchestrator.close(10)


class _FailingDenoiser(TorchDenoiserExecutor):
    def denoiser_step(self, *args):
        raise RuntimeError("the denoiser fell over")


def test_a_tower_failure_reaches_its_requests_and_frees_every_sequence(tiny_model):
    c = tiny_model.config
    towers = (ContextTower(TorchContextExecutor(tiny_model), c, MAX_CONTEXT, torch.float32, 8),
              DenoiserTower(_FailingDenoiser(tiny_model), c, MAX_CONTEXT, torch.float32, 8))
    orchestrator = _orchestrator(tiny_model, towers)
    collected = [Collect() for _ in range(3)]
    for mode, responder in zip(("diffusion", "ar", "mock-ar"), collected):
        orchestrator.submit([5, 6], GenerationSettings(mode=mode, max_new_tokens=8,
                                                       block_size=8), responder)
    assert all(r.ended.wait(60) for r in collected)
    assert "the denoiser fell over" in collected[0].error
    assert all(t.stats()["live_sequences"] == 0 for t in towers)
    orchestrator.close(10)


class _SlowFailingDenoiser(TorchDenoiserExecutor):
    def __init__(self, model, started):
        super().__init__(model)
        self.started = started

    def denoiser_step(self, *args):
        self.started.set()
        time.sleep(0.3)
        raise RuntimeError("the denoiser fell over")


def test_a_request_that_arrives_while_a_round_fails_gets_the_error_and_the_loop_goes_on(
        tiny_model):
    """A request submitted while a round's call is failing waits in the session's inbox with
    no row yet; the failure reaches it too, and the loop serves the next request."""
    c = tiny_model.config
    started = threading.Event()
    towers = (ContextTower(TorchContextExecutor(tiny_model), c, MAX_CONTEXT, torch.float32, 8),
              DenoiserTower(_SlowFailingDenoiser(tiny_model, started), c, MAX_CONTEXT,
                            torch.float32, 8))
    orchestrator = _orchestrator(tiny_model, towers)
    first, late, after = Collect(), Collect(), Collect()
    orchestrator.submit([5, 6], GenerationSettings(max_new_tokens=8, block_size=8), first)
    assert started.wait(30)
    orchestrator.submit([7, 8], GenerationSettings(mode="ar", max_new_tokens=4), late)
    assert first.ended.wait(30) and late.ended.wait(30)
    assert "the denoiser fell over" in first.error and "the denoiser fell over" in late.error
    orchestrator.submit([9, 10], GenerationSettings(mode="ar", max_new_tokens=3,
                                                    stop_at_eos=False), after)
    assert after.ended.wait(30) and after.error is None and len(after.result.tokens) == 3
    orchestrator.close(10)


def test_requests_the_loop_refuses_never_reach_the_towers(tiny_model, towers):
    orchestrator = _orchestrator(tiny_model, towers)
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, "):
        orchestrator.submit([5, tiny_model.config.vocab_size], GenerationSettings(), Collect())
    with pytest.raises(CacheFullError, match="maximum context"):
        orchestrator.submit(list(range(4, 4 + MAX_CONTEXT)), GenerationSettings(), Collect())
    assert all(t.stats()["opened"] == 0 for t in towers)
    orchestrator.close(10)


def test_a_full_slot_table_refuses_new_sequences_and_keeps_the_others():
    table = SlotTable(4)
    keys = [SequenceKey.new() for _ in range(5)]
    slots = [table.open(k) for k in keys[:4]]
    assert sorted(slots) == [0, 1, 2, 3]
    with pytest.raises(TowerBusy, match="all 4 sequence slots"):
        table.open(keys[4])
    assert table.release(keys[2]) and not table.release(keys[2])
    assert table.open(keys[4]) == slots[2]
    assert table.stats(100)["cache_bytes"] == 400


def test_a_slot_table_hands_out_the_lowest_free_slot_first():
    """Released in the order 0, 3, 1, the next three sequences take 0, 1, 3: new rows fill
    the bottom of the pool, where the live ones are, so a step's rows stay side by side
    (last freed first would hand out 1, 3, 0)."""
    table = SlotTable(6)
    keys = [SequenceKey.new() for _ in range(9)]
    assert [table.open(k) for k in keys[:5]] == [0, 1, 2, 3, 4]
    for k in (keys[0], keys[3], keys[1]):
        assert table.release(k)
    assert [table.open(k) for k in keys[5:8]] == [0, 1, 3]
    assert table.open(keys[8]) == 5


def test_settings_cross_the_boundary_unchanged_and_are_validated_again():
    s = GenerationSettings(mode="mock-ar", max_new_tokens=24, block_size=8, temperature=0.5,
                           top_p=0.9, seed=2**40)
    assert settings_from_json(settings_to_json(s)) == s
    with pytest.raises(ValueError, match="confidence_threshold"):
        settings_from_json(settings_to_json(s).replace('"confidence_threshold": 0.8',
                                                       '"confidence_threshold": 2.0'))


@pytest.mark.parametrize("text", ['{"mode": "ar",', '{"beam_width": 4}', "[1, 2]", "null"])
def test_malformed_settings_are_one_clear_request_error(text):
    with pytest.raises(TowerRequestError, match="^settings must be a JSON object") as raised:
        settings_from_json(text)
    assert "\n" not in str(raised.value)


def _extend(keys, ids, mirror=False):
    return ExtendGroup(keys, torch.tensor(ids), [mirror] * len(keys), [False] * len(keys),
                       [None] * len(keys))


def test_steps_for_a_sequence_the_tower_does_not_hold_are_refused_not_started(tiny_model,
                                                                              towers):
    context, denoiser = towers
    mask = tiny_model.config.mask_token_id
    key = SequenceKey(3, "owner")
    s = GenerationSettings(block_size=8)
    steps = [(context, encode_context(ContextWork(groups=[_extend([key], [[5]])]), SECRET)),
             (denoiser, encode_denoiser(DenoiserWork(mock=MockGroup([key], [5], [s], [0])),
                                        SECRET))]
    for tower, inputs in steps:
        with pytest.raises(UnknownSequence, match="sequence 3 is not open here"):
            handle(tower, inputs, SECRET)
    assert context.stats()["opened"] == denoiser.stats()["opened"] == 0
    out = handle(context, encode_context(ContextWork(opened=[key],
                                                     groups=[_extend([key], [[5, 6]], True)]),
                                         SECRET), SECRET)
    assert out["cache_delta"].shape == (1,) and context.stats()["live_sequences"] == 1


def test_only_the_opener_can_step_or_release_a_sequence(tiny_model, towers):
    context, _ = towers
    mine = SequenceKey.new()
    handle(context, encode_context(ContextWork(opened=[mine]), SECRET), SECRET)
    thief = SequenceKey(mine.id, "guessed-owner-\u00e9")
    handle(context, encode_context(ContextWork(released=[thief]), SECRET), SECRET)
    assert context.stats()["live_sequences"] == 1
    with pytest.raises(UnknownSequence, match="belongs to another request"):
        handle(context, encode_context(ContextWork(groups=[_extend([thief], [[5]])]), SECRET),
               SECRET)
    with pytest.raises(TowerRequestError, match="already open"):
        handle(context, encode_context(ContextWork(opened=[thief]), SECRET), SECRET)
    handle(context, encode_context(ContextWork(released=[mine]), SECRET), SECRET)
    assert context.stats()["live_sequences"] == 0


def test_a_round_without_the_secret_is_refused_and_stats_show_counts_only(towers):
    context, _ = towers
    inputs = encode_context(ContextWork(opened=[SequenceKey.new()]), SECRET)
    for secret in (None, "guess"):
        if secret is None:
            inputs.pop("tower_secret")
        else:
            inputs["tower_secret"] = np.array([secret.encode()], dtype=np.object_)
        with pytest.raises(TowerAccessDenied, match="answer the orchestrator only"):
            handle(context, inputs, SECRET)
    stats = handle(context, {"op": np.array([b"stats"], dtype=np.object_)}, SECRET)
    assert b"live_sequences" in stats["stats"][0] and context.stats()["opened"] == 0


@pytest.mark.parametrize("change, needle", [
    (lambda i: i.update(group_width=np.array([3], np.int64)), "input_ids has 2 values"),
    (lambda i: i.update(mirror=np.array([True, False])), "mirror has 2 values, expected 1"),
    (lambda i: i.update(row_owner=np.array([], dtype=np.object_)), "differ in length"),
    (lambda i: i.update(op=np.array([b"extend"], dtype=np.object_)), "unknown op 'extend'"),
    (lambda i: i.update(sample=np.array([b"{oops"], dtype=np.object_)), "settings must be"),
    (lambda i: i.update(chain=np.array([1, 1], np.int64)), "chain has 2 values, expected 1"),
    (lambda i: i.update(chain=np.array([0], np.int64)), "chain must be at least 1"),
    (lambda i: i.update(chain=np.array([3], np.int64), mirror=np.array([True])),
     "and 1 for a row the denoiser mirrors"),
])
def test_malformed_round_tensors_are_one_clear_error(towers, change, needle):
    context, _ = towers
    key = SequenceKey.new()
    handle(context, encode_context(ContextWork(opened=[key]), SECRET), SECRET)
    inputs = encode_context(ContextWork(groups=[_extend([key], [[5, 6]])]), SECRET)
    change(inputs)
    with pytest.raises(TowerRequestError, match=needle) as raised:
        handle(context, inputs, SECRET)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("block, steps_left, needle", [
    ([3, FROM_TOWER, 3, 3], 2, "either all -1"),
    ([3, 3, 3, 3], 0, "steps_left must be at least 1"),
])
def test_malformed_denoiser_blocks_are_one_clear_error(tiny_model, towers, block, steps_left,
                                                       needle):
    """A block goes on from the tower's last step only whole (every id FROM_TOWER, its key
    and steps left the tower's own); any other block needs its steps left."""
    _, denoiser = towers
    key = SequenceKey.new()
    handle(denoiser, encode_denoiser(DenoiserWork(opened=[key]), SECRET), SECRET)
    group = DenoiseGroup([key], torch.tensor([block]), [GenerationSettings(block_size=4)], [0],
                         [steps_left])
    with pytest.raises(TowerRequestError, match=needle):
        handle(denoiser, encode_denoiser(DenoiserWork(groups=[group]), SECRET), SECRET)


def test_a_tower_error_reaches_the_caller_as_one_call_error(towers):
    call = direct_call(*towers, SECRET)
    with pytest.raises(TowerCallError, match="^context_tower: sequence .* is not open"):
        call(CONTEXT_MODEL, encode_context(ContextWork(groups=[_extend([SequenceKey.new()],
                                                                       [[5]])]), SECRET),
             ["token"])


def test_sequence_keys_are_random_not_counted():
    ids = {SequenceKey.new().id for _ in range(64)}
    assert len(ids) == 64 and all(0 <= i < 2**63 for i in ids)
    assert len({i >> 32 for i in ids}) > 1  # a PID << 32 plus a counter keeps one prefix


def test_scores_cross_the_boundary_unchanged(tiny_model, towers):
    s = GenerationSettings(mode="ar", max_new_tokens=5, logprobs=2, echo=True,
                           stop_at_eos=False)
    orchestrator = _orchestrator(tiny_model, towers)
    responder = Collect()
    orchestrator.submit([5, 6, 7, 8], s, responder)
    assert responder.ended.wait(60)
    orchestrator.close(10)
    with TwoTowerSession(TorchContextExecutor(tiny_model), TorchDenoiserExecutor(tiny_model),
                         tiny_model.config, MAX_CONTEXT) as session:
        expected = session.generate([Request([5, 6, 7, 8], s)])[0]
    got = responder.result
    assert got.tokens == expected.tokens
    assert got.prompt_logprobs == expected.prompt_logprobs and len(got.prompt_logprobs) == 3
    assert got.logprobs == expected.logprobs and len(got.logprobs) == 5
    streamed = [x for block in responder.scores for x in block["tokens"]]
    assert [x[:2] for x in streamed] == [[t.token, t.logprob] for t in expected.logprobs]
    assert responder.scores[0]["prompt"][0][0] == 6 and "prompt" not in responder.scores[1]


class _Strict(Collect):
    """A responder that, like a Triton response sender, must not be asked about its client
    once its final answer is out."""

    def __init__(self):
        super().__init__()
        self.violations = 0

    def gone(self):
        if self.ended.is_set():
            self.violations += 1
        return False


class _Slow(_Strict):
    """From its second question on, answers only once ``partner`` has ended: the watcher,
    which asks it first, then holds a list taken while the partner still ran."""

    def __init__(self, partner):
        super().__init__()
        self.partner, self.calls = partner, 0

    def gone(self):
        self.calls += 1
        if self.calls >= 2:
            self.partner.ended.wait(0.5)
        return super().gone()


def test_a_finished_request_is_never_asked_whether_its_client_left(tiny_model, towers,
                                                                   monkeypatch):
    """A Triton response sender is freed by its final answer; asking it afterwards whether
    its client left crashed tritonserver."""
    from trt_twotower.serve import orchestrator as module
    from trt_twotower.serve.orchestrator import Guarded
    strict = _Strict()
    guarded = Guarded(strict)
    guarded.finish(None, [], None)
    assert guarded.gone() is False and strict.violations == 0
    monkeypatch.setattr(module, "WATCH_SECONDS", 0.01)
    orchestrator = _orchestrator(tiny_model, towers)
    short = _Strict()
    slow = _Slow(short)
    orchestrator.submit([5, 6], GenerationSettings(mode="ar", max_new_tokens=70,
                                                   stop_at_eos=False), slow)
    orchestrator.submit([7, 8], GenerationSettings(mode="ar", max_new_tokens=30,
                                                   stop_at_eos=False), short)
    assert short.ended.wait(30) and slow.ended.wait(30)
    time.sleep(0.1)
    orchestrator.close(10)
    assert slow.calls >= 2 and short.violations == 0


def _ar_jobs(model, count=6, stop_at_eos=False):
    gen = torch.Generator().manual_seed(11)
    return [(torch.randint(4, model.config.vocab_size, (1 + i % 4,), generator=gen).tolist(),
             GenerationSettings(mode="ar", max_new_tokens=6 + 5 * i,
                                temperature=(0.0, 0.8)[i % 2], top_k=(None, 20)[i % 2],
                                seed=50 + i, logprobs=(None, 2)[i % 2 == 0],
                                stop_at_eos=stop_at_eos))
            for i in range(count)]


def _solo(model, config, jobs):
    session = TwoTowerSession(TorchContextExecutor(model), TorchDenoiserExecutor(model), config,
                              MAX_CONTEXT)
    try:
        return [session.generate([Request(p, s)])[0] for p, s in jobs]
    finally:
        session.close()


def _run(orchestrator, jobs, towers):
    """Every job's answer, once each sequence it opened was released (checked before the
    orchestrator closes: closing frees whatever is still open)."""
    collected = [Collect() for _ in jobs]
    for (prompt, s), responder in zip(jobs, collected):
        orchestrator.submit(prompt, s, responder)
    assert all(r.ended.wait(120) for r in collected)
    _freed_soon(towers)
    orchestrator.close(10)
    return collected


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_ar_rounds_start_before_the_last_is_answered_with_the_same_tokens(tiny_model,
                                                                          stop_at_eos):
    """Towers in other processes: a round of AR rows is written and sent while the last one
    computes (each call here takes 20 ms more, so calls in turn would never overlap). Tokens,
    logprobs and context steps equal each request run alone in process; with EOS drawn
    mid-way, a row written before the loop knew it had stopped takes no step."""
    import dataclasses

    config = tiny_model.config
    if stop_at_eos:
        free = _solo(tiny_model, config, _ar_jobs(tiny_model))
        config = dataclasses.replace(config, eos_token_id=free[-1].tokens[9])
    towers = (ContextTower(TorchContextExecutor(tiny_model), config, MAX_CONTEXT,
                           torch.float32, 8),
              DenoiserTower(TorchDenoiserExecutor(tiny_model), config, MAX_CONTEXT,
                            torch.float32, 8))
    slow, spans = _slow_calls(towers, 0.02)
    orchestrator = Orchestrator(slow, SECRET, config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    jobs = _ar_jobs(tiny_model, stop_at_eos=stop_at_eos)
    collected = _run(orchestrator, jobs, towers)
    for got, alone in zip(collected, _solo(tiny_model, config, jobs)):
        assert got.error is None and got.result.tokens == alone.tokens
        # batched rows against a row alone: 1e-4 (measured drift up to 3.9e-5,
        # tests/runtime/test_torch_executor.py)
        assert [s.token for s in got.result.logprobs] == [s.token for s in alone.logprobs]
        assert [s.logprob for s in got.result.logprobs] == pytest.approx(
            [s.logprob for s in alone.logprobs], abs=1e-4)
        assert got.result.stats.context_steps == alone.stats.context_steps
    if stop_at_eos:
        assert any(len(r.result.tokens) < s.max_new_tokens and
                   r.result.tokens[-1] == config.eos_token_id
                   for r, (_, s) in zip(collected, jobs))
    context = sorted((s[1], s[2]) for s in spans if s[0] == CONTEXT_MODEL and s[3])
    ahead = [(a, b) for a, b in zip(context, context[1:]) if b[0] < a[1]]
    assert len(ahead) >= 3, "each AR round waited for the last one's answer"


def test_denoiser_calls_start_before_the_last_is_answered_with_the_same_tokens(tiny_model,
                                                                              towers, rng):
    """Towers in other processes: a denoiser call is written and sent while the last one
    computes (each here takes 20 ms more, so calls in turn would never overlap). A row mid-
    block goes on from the block the tower's last step left it; one whose block resolved
    there takes no step. Mixed modes, γ, temperatures and budgets: each request's solo tokens
    and denoiser evaluations, and no sequence left open."""
    slow, spans = _slow_calls(towers, 0.02, only=DENOISER_MODEL)
    orchestrator = Orchestrator(slow, SECRET, tiny_model.config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    jobs = _mixed(tiny_model, rng, 9)
    collected = _run(orchestrator, jobs, towers)
    for got, alone in zip(collected, _solo(tiny_model, tiny_model.config, jobs)):
        assert got.error is None and got.result.tokens == alone.tokens
        assert got.result.stats.denoiser_evals == alone.stats.denoiser_evals
    denoiser = sorted((s[1], s[2]) for s in spans if s[0] == DENOISER_MODEL and s[3])
    ahead = [(a, b) for a, b in zip(denoiser, denoiser[1:]) if b[0] < a[1]]
    assert len(ahead) >= 3, "each denoiser call waited for the last one's answer"


def test_a_diffusion_client_that_leaves_with_a_step_written_ahead_is_freed_after_it(
        tiny_model, towers):
    """Denoiser calls written ahead (20 ms each): a client that leaves after its first block
    may have a step in the call under way and one in the call written after it. Its sequence
    is still released on both towers (the release rides behind those calls), and the request
    beside it keeps its solo tokens."""
    slow, _ = _slow_calls(towers, 0.02, only=DENOISER_MODEL)
    orchestrator = Orchestrator(slow, SECRET, tiny_model.config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    s = GenerationSettings(max_new_tokens=32, block_size=8, steps_per_block=8,
                           forced_commits=1, seed=5, stop_at_eos=False)
    leaving, staying = Collect(gone_after_blocks=1), Collect()
    orchestrator.submit([5, 6, 7], s, leaving)
    orchestrator.submit([8, 9], s, staying)
    assert leaving.ended.wait(60) and staying.ended.wait(60)
    _freed_soon(towers, opened=2)
    orchestrator.close(10)
    assert leaving.result.cancelled and len(leaving.result.tokens) < 32
    assert staying.error is None
    assert staying.result.tokens == _solo(tiny_model, tiny_model.config,
                                          [([8, 9], s)])[0].tokens


def test_ar_calls_step_one_token_while_requests_arrive_then_chain_again(tiny_model, towers):
    """With AR calls written ahead, an arriving request waits for the call computing and the
    one written ahead: the call that admits a request and the one after it step one token
    per row; between arrivals calls chain ``ar_steps`` tokens again. Tokens stay each
    request's own."""
    written = {}

    def recorded(name, inputs, outputs):
        if name == CONTEXT_MODEL and "chain" in inputs:
            written[int(inputs["call_order"][1])] = (len(inputs.get("open_id", [])),
                                                     int(inputs["chain"].max()))
        return slow(name, inputs, outputs)
    slow, _ = _slow_calls(towers, 0.02, only=CONTEXT_MODEL)
    orchestrator = Orchestrator(recorded, SECRET, tiny_model.config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8, ar_steps=4), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    jobs = [([5, 6, 7], GenerationSettings(mode="ar", max_new_tokens=40, stop_at_eos=False)),
            ([8, 9], GenerationSettings(mode="ar", max_new_tokens=24, stop_at_eos=False))]
    first, second = Collect(), Collect()
    orchestrator.submit(*jobs[0], first)
    deadline = time.monotonic() + 30
    while sum(map(len, first.blocks)) < 16 and time.monotonic() < deadline:
        time.sleep(0.005)
    orchestrator.submit(*jobs[1], second)
    assert first.ended.wait(60) and second.ended.wait(60)
    orchestrator.close(10)
    calls = [written[i] for i in sorted(written)]
    admitting = [i for i, (opened, _) in enumerate(calls) if opened]
    assert len(admitting) == 2
    for i in admitting:
        assert [chain for _, chain in calls[i:i + 2]] == [1, 1]
    assert 4 in [chain for _, chain in calls[admitting[0] + 2:admitting[1]]]
    assert 4 in [chain for _, chain in calls[admitting[1] + 2:]]
    for got, alone in zip((first, second), _solo(tiny_model, tiny_model.config, jobs)):
        assert got.error is None and got.result.tokens == alone.tokens


def test_a_call_that_overtakes_its_predecessor_is_sent_again_after_it(tiny_model, towers):
    """Two calls under way can reach a tower the other way round (Triton hands BLS requests
    over on a thread pool). Here the third context call is held back 0.3 s before it reaches
    the tower: the fourth arrives first, is refused untouched, and goes again once the third
    is answered; every token is still each request's own."""
    call = direct_call(*towers, SECRET)
    refused = []

    def late(name, inputs, outputs):
        if name == CONTEXT_MODEL and int(inputs["call_order"][1]) == 3:
            time.sleep(0.3)
        try:
            return call(name, inputs, outputs)
        except TowerCallOutOfOrder:
            refused.append(int(inputs["call_order"][1]))
            raise
    orchestrator = Orchestrator(late, SECRET, tiny_model.config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16,
                                stream_interval=STREAM_INTERVAL)
    jobs = _ar_jobs(tiny_model, count=3)
    collected = _run(orchestrator, jobs, towers)
    assert refused[:1] == [4]  # (a later call may overtake the resent one in turn)
    for got, alone in zip(collected, _solo(tiny_model, tiny_model.config, jobs)):
        assert got.error is None and got.result.tokens == alone.tokens


def test_a_tower_runs_each_callers_calls_in_the_order_it_started_them(towers):
    """A call that overtook an earlier one is refused before it touches anything; one that
    already ran is refused; callers are independent."""
    context, _ = towers
    first, second = SequenceKey.new(), SequenceKey.new()

    def opening(key, caller, index):
        inputs = encode_context(ContextWork(opened=[key]), SECRET)
        inputs["call_order"] = np.array([caller, index], dtype=np.int64)
        return inputs
    with pytest.raises(CallOutOfOrder, match="out of order: call 2 arrived before call 1"):
        handle(context, opening(second, 7, 2), SECRET)
    assert context.stats()["opened"] == 0
    handle(context, opening(first, 7, 1), SECRET)
    handle(context, opening(second, 7, 2), SECRET)
    with pytest.raises(TowerRequestError, match="call 2 of this caller has already run"):
        handle(context, opening(SequenceKey.new(), 7, 2), SECRET)
    handle(context, opening(SequenceKey.new(), 8, 1), SECRET)
    assert context.stats()["opened"] == 3


def test_an_ar_client_that_goes_away_mid_stream_frees_its_sequence(tiny_model, towers):
    """Rounds written ahead still notice a client that left: its sequence is released and
    no later token reaches it."""
    orchestrator = _orchestrator(tiny_model, towers)
    responder = Collect(gone_after_blocks=2)
    orchestrator.submit([5, 6, 7], GenerationSettings(mode="ar", max_new_tokens=60,
                                                      stop_at_eos=False), responder)
    assert responder.ended.wait(60)
    assert responder.result.cancelled and len(responder.result.tokens) < 60
    streamed = sum(responder.blocks, [])   # tokens held back when it left are not sent
    assert streamed and streamed == responder.result.tokens[:len(streamed)]
    _freed_soon(towers[:1], opened=1)
    orchestrator.close(10)


def test_held_tokens_go_first_at_once_then_at_least_the_interval_at_a_time():
    held = HeldTokens(4)
    assert held.add([1]) == [1]                      # the first at once
    assert held.add([2]) == [] and held.add([3, 4]) == []
    assert held.add([5]) == [2, 3, 4, 5]             # four waiting: all of them go
    assert held.add([6, 7, 8, 9, 10]) == [6, 7, 8, 9, 10]   # a longer block goes whole
    assert held.add([11]) == [] and held.take() == [11] and held.take() == []
    every = HeldTokens(1)
    assert [every.add([t]) for t in (1, 2, 3)] == [[1], [2], [3]]
    with pytest.raises(ValueError, match="at least 1 token, not 0"):
        HeldTokens(0)


def test_a_stream_sends_the_interval_at_a_time_and_the_rest_with_the_final_answer(
        tiny_model, towers):
    """Six AR requests at once (rounds of one token while they arrive, then four), streamed
    8 tokens at a time after the first: every message between the first and the final answer
    carries at least 8, the final answer the fewer than 8 left; together the request's own
    tokens, each message with its own tokens' scores."""
    config = tiny_model.config
    orchestrator = Orchestrator(direct_call(*towers, SECRET), SECRET, config, MAX_CONTEXT,
                                SchedulerLimits(capacity=8), max_waiting=16, stream_interval=8)
    jobs = _ar_jobs(tiny_model)
    collected = _run(orchestrator, jobs, towers)
    for (_, s), got, alone in zip(jobs, collected, _solo(tiny_model, config, jobs)):
        assert got.error is None and sum(got.blocks, []) == alone.tokens
        sent = got.blocks[:len(got.blocks) - bool(got.tail)]
        assert len(sent[0]) < 8 and all(len(ids) >= 8 for ids in sent[1:])
        assert len(got.tail) < 8
        if s.logprobs is not None:
            assert [[x[0] for x in scores["tokens"]] for scores in got.scores] == got.blocks
    assert sum(len(got.blocks) for got in collected) <= sum(
        2 + s.max_new_tokens // 8 for _, s in jobs), "tokens were not held back"
    with pytest.raises(ValueError, match="at least 1 token"):
        Orchestrator(direct_call(*towers, SECRET), SECRET, config, MAX_CONTEXT,
                     SchedulerLimits(capacity=8), max_waiting=16, stream_interval=0)


def test_a_request_that_does_not_stream_gets_only_its_final_answer(tiny_model, towers):
    """Its tokens go with the final answer: nothing is held, scored or sent on the way."""
    quiet = Collect()
    quiet.stream = False
    orchestrator = _orchestrator(tiny_model, towers)
    s = GenerationSettings(mode="ar", max_new_tokens=9, logprobs=1, stop_at_eos=False)
    orchestrator.submit([5, 6, 7], s, quiet)
    assert quiet.ended.wait(60)
    orchestrator.close(10)
    assert quiet.blocks == [] and quiet.tail == [] and len(quiet.result.tokens) == 9
