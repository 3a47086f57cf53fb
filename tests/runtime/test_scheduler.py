"""The step loop behind the in-process engine: requests of every mode and setting share rounds
and still produce their solo tokens; a request arriving mid-batch joins within a round; the
waiting queue is bounded; cancellation, timeouts and failures free slots at once."""

import threading

import pytest
import torch

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.scheduler import SchedulerLimits
from trt_twotower.runtime.session import Request, SessionBusy, TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor

MAX_CONTEXT = 64


def _session(model, **kw):
    return TwoTowerSession(TorchContextExecutor(model), TorchDenoiserExecutor(model),
                           model.config, MAX_CONTEXT, **kw)


def _mixed_requests(config, count, seed=0):
    """Modes, γ, temperatures, seeds, prompt lengths and budgets all drawn per request."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    requests = []
    for i in range(count):
        mode = pick(["diffusion", "mock-ar", "ar"])
        budget = pick([4, 8, 12]) if mode == "diffusion" else pick([3, 6, 9])
        settings = GenerationSettings(
            mode=mode, max_new_tokens=budget, block_size=4, steps_per_block=pick([2, 4]),
            confidence_threshold=pick([0.3, 0.8, 0.95]), temperature=pick([0.0, 0.9]),
            seed=i, stop_at_eos=False)
        prompt = torch.randint(4, config.vocab_size, (pick([1, 3, 7, 12]),),
                               generator=gen).tolist()
        requests.append(Request(prompt, settings))
    return requests


def test_mixed_requests_submitted_from_many_threads_produce_their_solo_tokens(tiny_model):
    requests = _mixed_requests(tiny_model.config, 64)
    assert {r.settings.mode for r in requests} == {"diffusion", "mock-ar", "ar"}
    session = _session(tiny_model)
    handles = [None] * len(requests)

    def submit(i):
        handles[i] = session.submit(requests[i])
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = [h.result(timeout=120) for h in handles]
    solo_session = _session(tiny_model)
    for request, result in zip(requests, together):
        alone = solo_session.generate([request])[0]
        assert result.tokens == alone.tokens, request.settings
        assert len(result.tokens) == request.settings.max_new_tokens
        assert result.stats.denoiser_evals == alone.stats.denoiser_evals
    assert session.scheduler.rounds < sum(len(r.tokens) for r in together), \
        "rows of different requests must share rounds"


def test_a_request_arriving_mid_batch_joins_within_one_round(tiny_model):
    session = _session(tiny_model)
    started = threading.Event()
    long = session.submit(Request([5, 6, 7], GenerationSettings(
        mode="ar", max_new_tokens=48, stop_at_eos=False), lambda ids: started.set()))
    assert started.wait(30)
    admitted = {}
    original_add = session.scheduler.add

    def recording_add(request):
        admitted[id(request)] = session.scheduler.rounds
        return original_add(request)
    session.scheduler.add = recording_add
    short_request = Request([9, 10], GenerationSettings(max_new_tokens=4, block_size=4,
                                                        steps_per_block=4, stop_at_eos=False))
    submitted_at = session.scheduler.rounds
    short = session.submit(short_request)
    short.result(timeout=30)
    assert not long.done, "the short request must not wait for the long one to finish"
    assert admitted[id(short_request)] <= submitted_at + 1
    assert len(long.result(timeout=60).tokens) == 48


def test_a_full_waiting_queue_refuses_with_a_busy_error(tiny_model):
    session = _session(tiny_model, limits=SchedulerLimits(capacity=1), max_waiting=2)
    long = GenerationSettings(mode="ar", max_new_tokens=60, stop_at_eos=False)
    running = threading.Event()
    handles = [session.submit(Request([5], long, lambda ids: running.set()))]
    assert running.wait(30)  # the first holds the only slot; two more may wait
    handles += [session.submit(Request([5], long)) for _ in range(2)]
    with pytest.raises(SessionBusy, match="waiting"):
        session.submit(Request([5], long))
    for handle in handles:
        handle.cancel()
    assert all(h.result(timeout=30).cancelled for h in handles)
    assert len(session.scheduler.towers.free) == 1   # the only slot is back


def test_cancel_and_timeout_free_the_slot_within_one_round(tiny_model):
    session = _session(tiny_model)
    first = threading.Event()
    settings = GenerationSettings(mode="ar", max_new_tokens=60, stop_at_eos=False)
    handle = session.submit(Request([5, 6], settings, lambda ids: first.set()))
    assert first.wait(30)
    cancelled_at = session.scheduler.rounds
    handle.cancel()
    result = handle.result(timeout=30)
    assert result.cancelled and len(result.tokens) < 60
    assert session.scheduler.rounds <= cancelled_at + 2  # the round in flight, then one
    timed = session.submit(Request([5, 6], settings), timeout=0.0)
    assert timed.result(timeout=30).cancelled and timed.timed_out
    capacity = session.scheduler.limits.capacity
    assert len(session.scheduler.towers.free) == capacity


def test_streaming_yields_each_block_as_it_lands(tiny_model):
    session = _session(tiny_model)
    s = GenerationSettings(max_new_tokens=12, block_size=4, steps_per_block=4,
                           stop_at_eos=False)
    blocks = list(session.stream([5, 6, 7], s))
    assert [len(b) for b in blocks] == [4, 4, 4]
    assert sum(blocks, []) == session.generate([Request([5, 6, 7], s)])[0].tokens


class _FailingDenoiser(TorchDenoiserExecutor):
    def __init__(self, model):
        super().__init__(model)
        self.fail = True

    def denoiser_step(self, block_ids, t, cache):
        if self.fail:
            raise RuntimeError("the denoiser device fell over")
        return super().denoiser_step(block_ids, t, cache)


def test_an_executor_failure_reaches_its_requests_and_the_loop_goes_on(tiny_model):
    denoiser = _FailingDenoiser(tiny_model)
    session = TwoTowerSession(TorchContextExecutor(tiny_model), denoiser, tiny_model.config,
                              MAX_CONTEXT)
    s = GenerationSettings(max_new_tokens=4, block_size=4, steps_per_block=4,
                           stop_at_eos=False)
    handle = session.submit(Request([5, 6], s))
    with pytest.raises(RuntimeError, match="fell over"):
        handle.result(timeout=30)
    denoiser.fail = False
    again = session.generate([Request([5, 6], s)])[0]
    assert again.tokens == _session(tiny_model).generate([Request([5, 6], s)])[0].tokens
    assert len(session.scheduler.towers.free) == session.scheduler.limits.capacity


def test_a_long_prompt_is_prefilled_in_chunks_while_other_rows_go_on(tiny_model):
    """With a prompt-token budget of 4 per round, a 40-token prompt takes 10 rounds, and a
    short AR request admitted with it produces a token in each of them (one per round)."""
    session = _session(tiny_model, limits=SchedulerLimits(prefill_tokens=4, ar_steps=1))
    tokens_at_round = []
    scheduler = session.scheduler
    short = Request([5], GenerationSettings(mode="ar", max_new_tokens=8, stop_at_eos=False),
                    lambda ids: tokens_at_round.append(scheduler.rounds))
    long = Request(list(range(4, 44)), GenerationSettings(mode="ar", max_new_tokens=2,
                                                          stop_at_eos=False))
    results = session.generate([short, long])
    assert len(results[0].tokens) == 8 and len(results[1].tokens) == 2
    assert tokens_at_round == list(range(tokens_at_round[0], tokens_at_round[0] + 8))
    assert results[0].tokens == _session(tiny_model).generate([short])[0].tokens


def test_prompts_of_one_length_are_prefilled_in_one_step_with_their_solo_tokens(tiny_model):
    """Requests admitted together whose prompt chunks have one length push them in one
    context step, [rows, T], not one per request: here six 9-token prompts (AR and
    diffusion) in one step and three mock-AR prompts (8 tokens pushed, the last kept back)
    in another, each request with its solo tokens."""
    gen = torch.Generator().manual_seed(3)
    modes = ["ar", "diffusion", "mock-ar"] * 3
    requests = [Request(torch.randint(4, tiny_model.config.vocab_size, (9,),
                                      generator=gen).tolist(),
                        GenerationSettings(mode=mode, max_new_tokens=8, block_size=4,
                                           steps_per_block=4, temperature=(0.0, 0.9)[i % 2],
                                           seed=i, stop_at_eos=False))
                for i, mode in enumerate(modes)]
    context = TorchContextExecutor(tiny_model)
    shapes = []
    step = context.context_step
    context.context_step = lambda ids, cache: (shapes.append(tuple(ids.shape)),
                                               step(ids, cache))[1]
    with TwoTowerSession(context, TorchDenoiserExecutor(tiny_model), tiny_model.config,
                         MAX_CONTEXT) as session:
        together = session.generate(requests)
    prompts = sorted(shape for shape in shapes if shape[1] > 1 and shape[1] != 4)
    assert prompts == [(3, 8), (6, 9)], "prompts of one length were pushed one by one"
    solo = _session(tiny_model)
    for request, result in zip(requests, together):
        assert result.tokens == solo.generate([request])[0].tokens, request.settings


def test_a_batch_handed_over_whole_is_not_refused_by_the_waiting_bound(tiny_model):
    session = _session(tiny_model, limits=SchedulerLimits(capacity=2), max_waiting=1)
    s = GenerationSettings(mode="ar", max_new_tokens=2, stop_at_eos=False)
    results = session.generate([Request([5 + i], s) for i in range(6)])
    assert [len(r.tokens) for r in results] == [2] * 6


def test_requests_can_be_awaited_from_asyncio_while_the_loop_stays_free(tiny_model):
    import asyncio

    session = _session(tiny_model)
    s = GenerationSettings(mode="ar", max_new_tokens=6, stop_at_eos=False)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)
        beat = asyncio.create_task(ticker())
        results = await asyncio.gather(*(session.submit(Request([5 + i], s)).wait()
                                         for i in range(8)))
        beat.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert [len(r.tokens) for r in results] == [6] * 8 and ticks > 1
    assert results[3].tokens == _session(tiny_model).generate([Request([8], s)])[0].tokens


def _full_pass_logprobs(model, ids):
    """log p(ids[j + 1] | ids[:j + 1]) for every j, from one parallel forward pass over the
    whole sequence: independent of the loop's token-by-token steps."""
    with torch.no_grad():
        logits = model.context_logits(torch.tensor([ids]), model.new_cache(1))[0]
    return torch.log_softmax(logits, -1)


def test_echo_and_logprobs_score_each_token_as_one_full_forward_pass_does(tiny_model):
    """Tolerance 1e-4 (fp32, step-by-step against parallel attention and scan)."""
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(4, tiny_model.config.vocab_size, (9,), generator=gen).tolist()
    scored = GenerationSettings(mode="ar", max_new_tokens=6, temperature=0.8, top_k=40,
                                seed=4, stop_at_eos=False, logprobs=3, echo=True)
    other = GenerationSettings(mode="diffusion", max_new_tokens=8, block_size=4)
    result, _ = _session(tiny_model).generate([Request(prompt, scored), Request([5, 6], other)])
    ids = prompt + result.tokens
    logp = _full_pass_logprobs(tiny_model, ids)
    scores = result.prompt_logprobs + result.logprobs
    assert len(result.prompt_logprobs) == len(prompt) - 1 and len(result.logprobs) == 6
    assert [s.token for s in scores] == ids[1:]
    for j, score in enumerate(scores):
        assert abs(score.logprob - float(logp[j, ids[j + 1]])) < 1e-4
        best = torch.topk(logp[j], 3)
        assert [t for t, _ in score.top] == best.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(score.top, best.values.tolist())) < 1e-4
    plain = _session(tiny_model).generate([Request(prompt, GenerationSettings(
        mode="ar", max_new_tokens=6, temperature=0.8, top_k=40, seed=4, stop_at_eos=False))])
    assert plain[0].tokens == result.tokens, "scoring does not change what is sampled"


def test_logprobs_are_refused_outside_ar_mode():
    from trt_twotower.policy import GenerationError
    for mode in ("diffusion", "mock-ar"):
        with pytest.raises(GenerationError, match="only mode .ar. samples from"):
            GenerationSettings(mode=mode, logprobs=1)
    with pytest.raises(GenerationError, match=r"logprobs must lie in \[0, 20\]"):
        GenerationSettings(mode="ar", logprobs=21)


def _ar_requests(config, logprobs=None, stop_at_eos=False):
    gen = torch.Generator().manual_seed(7)
    return [Request(torch.randint(4, config.vocab_size, (1 + i % 5,), generator=gen).tolist(),
                    GenerationSettings(mode="ar", max_new_tokens=5 + 3 * i,
                                       temperature=(0.0, 0.8)[i % 2], top_k=(None, 20)[i % 2],
                                       seed=30 + i, logprobs=logprobs, stop_at_eos=stop_at_eos))
            for i in range(6)]


def test_ar_rows_chain_tokens_in_the_tower_and_keep_their_tokens_and_scores(tiny_model):
    """With ar_steps 4 an AR round yields up to 4 tokens per row (streamed as one delta),
    budgets that are not multiples of 4 are met exactly, and tokens and logprobs equal the
    one-token-per-round loop's."""
    one = _session(tiny_model, limits=SchedulerLimits(ar_steps=1)).generate(
        _ar_requests(tiny_model.config, logprobs=2))
    deltas = []
    requests = _ar_requests(tiny_model.config, logprobs=2)
    for request in requests:
        request.on_delta = lambda ids, seen=[]: deltas.append(len(ids))
    session = _session(tiny_model, limits=SchedulerLimits(ar_steps=4))
    chained = session.generate(requests)
    for a, b, request in zip(one, chained, requests):
        assert b.tokens == a.tokens and len(b.tokens) == request.settings.max_new_tokens
        assert b.logprobs == a.logprobs and len(b.logprobs) == len(b.tokens)
        assert b.stats.context_steps == a.stats.context_steps
    assert max(deltas) == 4 and sum(deltas) == sum(len(r.tokens) for r in one)
    longest = max(r.settings.max_new_tokens for r in requests)
    assert session.scheduler.rounds <= 2 + -(-longest // 4), "a round took one token per row"


def test_a_chain_stops_at_eos_inside_the_tower(tiny_model):
    """EOS drawn mid-chain ends the row there: the same tokens and the same number of
    context steps as one token per round (a tower that ran on past EOS would count more)."""
    import dataclasses

    free = _session(tiny_model, limits=SchedulerLimits(ar_steps=1)).generate(
        _ar_requests(tiny_model.config))
    eos = free[-1].tokens[6]   # a token the longest row draws mid-way
    config = dataclasses.replace(tiny_model.config, eos_token_id=eos)

    def run(steps):
        return TwoTowerSession(TorchContextExecutor(tiny_model),
                               TorchDenoiserExecutor(tiny_model), config, MAX_CONTEXT,
                               limits=SchedulerLimits(ar_steps=steps)).generate(
            _ar_requests(config, stop_at_eos=True))
    one, chained = run(1), run(4)
    assert any(len(r.tokens) < q.settings.max_new_tokens and r.tokens[-1] == eos
               for r, q in zip(one, _ar_requests(config)))
    for a, b in zip(one, chained):
        assert b.tokens == a.tokens
        assert b.stats.context_steps == a.stats.context_steps


def test_ar_rows_take_one_token_per_round_while_diffusion_rows_wait(tiny_model):
    """A chained context call would hold back the diffusion rows: while one is live, AR rows
    take one token per round."""
    deltas = []
    ar = Request([5, 6, 7], GenerationSettings(mode="ar", max_new_tokens=12, stop_at_eos=False),
                 lambda ids: deltas.append(len(ids)))
    diffusion = Request([8, 9], GenerationSettings(max_new_tokens=24, block_size=4,
                                                   steps_per_block=4, stop_at_eos=False))
    _session(tiny_model, limits=SchedulerLimits(ar_steps=4)).generate([ar, diffusion])
    assert set(deltas) == {1}


def test_towers_on_two_devices_run_a_rounds_calls_at_once_with_the_same_tokens(tiny_model):
    """LocalTowers runs the context call on a helper thread while the denoiser call runs
    when its towers are on two devices (forced here on the CPU): the same tokens as calls in
    turn. On one device (the default here) the context steps stay on the loop's thread."""
    from trt_twotower.runtime.local_towers import LocalTowers

    def run(at_once):
        context = TorchContextExecutor(tiny_model)
        threads = []
        step = context.context_step
        context.context_step = lambda *a: (threads.append(threading.current_thread().name),
                                           step(*a))[1]
        towers = LocalTowers(context, TorchDenoiserExecutor(tiny_model), tiny_model.config,
                             64, MAX_CONTEXT, at_once=at_once)
        with TwoTowerSession.over(towers, tiny_model.config, MAX_CONTEXT) as session:
            results = session.generate(_mixed_requests(tiny_model.config, 12))
        return [r.tokens for r in results], set(threads)
    in_turn, turn_threads = run(None)
    at_once, once_threads = run(True)
    assert at_once == in_turn
    assert not any(t.startswith("tower-call") for t in turn_threads)
    assert any(t.startswith("tower-call") for t in once_threads)
