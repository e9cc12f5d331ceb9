"""Continuous batching: requests join a running batch between steps and leave it when they finish.

Two levels: `DecodeBatch` (the shared KV cache rows join and leave) on the micro benchmark's trained
model, checked token for token and logit for logit against decoding each request alone; and the
asyncio `Scheduler` with the stub bigram model (expected outputs by hand), checking when rows join and
leave, isolation of a bad row, clients that go away, the queue limit, and that decoding leaves the
event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from ray_unlearn.serving.engine import DecodeBatch, Delta, GenerationRequest, LoadedModel, SamplingParams, generate
from ray_unlearn.serving.scheduler import Scheduler
from tests.unit.serving.stubs import CHAIN, ID, BigramModel, CharTokenizer, FailingTokenizer, req, sampled


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def collect(scheduler: Scheduler, model: LoadedModel, request: GenerationRequest) -> Delta:
    result = Delta("")
    async for d in scheduler.stream(model, request):
        result.add(d)
    return result


def outcome(d: Delta) -> tuple:
    return d.text, d.finish_reason, d.completion_tokens, d.token_ids, d.error


# ---------------------------------------------------------------- joining a running batch = decoding alone


class Recorder(torch.nn.Module):
    """The model, recording the next-token logits of every row of every forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.generation_config = model, model.config, model.generation_config
        self.logits: list[torch.Tensor] = []

    def forward(self, **kw):
        out = self.inner(**kw)
        self.logits.append(out.logits[:, -1, :].float().clone())
        return out


def drive(model, tokenizer, requests: list[GenerationRequest], arrivals: dict[int, list[int]]):
    """Decode `requests` in one DecodeBatch, request i joining at the step `arrivals` gives it: (the whole
    Delta per request, its next-token logits per step, the most rows a step decoded)."""
    rec, results = Recorder(model), {i: Delta("") for i in range(len(requests))}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in results}
    batch, widest, step = DecodeBatch(rec, tokenizer), 0, 0
    while len(batch) or step <= max(arrivals):
        phases = [(batch.keys, batch.step)] if len(batch) else []
        joining = arrivals.get(step, [])
        if joining:
            phases.append((joining, lambda j=joining: batch.join([(i, requests[i]) for i in j])))
        for keys, call in phases:
            widest = max(widest, len(keys))
            for i, d in call().items():
                results[i].add(d)
            for i, row in zip(keys, rec.logits[-1]):
                logits[i].append(row)
        step += 1
    return results, logits, widest


@pytest.fixture(scope="module")
def micro_model(micro_bench):
    from ray_unlearn.models.io import load_model, load_tokenizer

    return load_model(str(micro_bench.target_dir)).eval(), load_tokenizer(str(micro_bench.target_dir))


def micro_requests(micro_bench, tokenizer) -> list[GenerationRequest]:
    """Greedy and seeded sampled requests with prompts of different lengths (so that both the running rows and
    the joining ones get padded), one with a stop sequence."""
    from ray_unlearn.data.collate import encode_prompt

    items = micro_bench.splits()["forget10"]
    prompts = [encode_prompt(tokenizer, q) for q in
               [items[0]["question"], "What is 2 plus 3?", items[1]["question"] + " Tell me.", items[2]["question"],
                "Who?", items[3]["question"]]]
    params = [SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=12, temperature=1.0, seed=7),
              SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=2**64 - 1),
              SamplingParams(max_tokens=24, temperature=0, stop=(" as",)),
              SamplingParams(max_tokens=9, temperature=1.2, seed=0), SamplingParams(max_tokens=3, temperature=0)]
    return [GenerationRequest("m", tuple(p), sp) for p, sp in zip(prompts, params)]


def test_requests_joining_a_running_batch_decode_as_if_alone(micro_bench, micro_model, one_thread):
    model, tok = micro_model
    requests = micro_requests(micro_bench, tok)
    alone = [drive(model, tok, [r], {0: [0]}) for r in requests]
    together, logits, widest = drive(model, tok, requests, {0: [0], 1: [1, 2], 3: [3], 4: [4], 9: [5]})
    assert widest >= 4  # they did decode together
    for i, (res, lg, _) in enumerate(alone):
        assert outcome(together[i]) == outcome(res[0]), f"request {i}"
        assert len(logits[i]) == len(lg[0]) == together[i].completion_tokens
        torch.testing.assert_close(torch.stack(logits[i]), torch.stack(lg[0]), atol=2e-5, rtol=1e-5)
    assert {together[i].finish_reason for i in together} == {"stop", "length"}
    assert together[0].text.strip() == micro_bench.splits()["forget10"][0]["answer"]


def test_staggered_clients_through_the_scheduler_get_what_they_get_alone(micro_bench, micro_model, one_thread):
    """Client k starts once client 0 has received k Deltas: each joins the running batch mid-way."""
    model, tok = micro_model
    requests = micro_requests(micro_bench, tok)
    alone = generate(model, tok, requests[:1]) + [generate(model, tok, [r])[0] for r in requests[1:]]
    loaded, scheduler = LoadedModel(model, tok), Scheduler(max_running=8, max_waiting=8)

    async def main() -> list[Delta]:
        received = asyncio.Condition()
        count = [0]

        async def first() -> Delta:
            result = Delta("")
            async for d in scheduler.stream(loaded, requests[0]):
                result.add(d)
                async with received:
                    count[0] += 1
                    received.notify_all()
            return result

        async def later(k: int) -> Delta:
            async with received:
                await received.wait_for(lambda: count[0] >= k)
            return await collect(scheduler, loaded, requests[k])

        out = await asyncio.gather(first(), *(later(k) for k in range(1, len(requests))))
        await scheduler.close()
        return out

    together = run(main())
    assert [outcome(d) for d in together] == [outcome(d) for d in alone]
    stats = scheduler.stats()
    assert stats["largest"] >= 4 and stats["requests"] == len(requests) and stats["running"] == 0


# ---------------------------------------------------------------- the scheduler, by hand


def stub(chain=CHAIN, tokenizer=None, model=None) -> LoadedModel:
    return LoadedModel(model or BigramModel(chain), tokenizer or CharTokenizer())


def alone(loaded: LoadedModel, request: GenerationRequest) -> tuple:
    return outcome(generate(BigramModel(CHAIN), loaded.tokenizer, [request])[0])


def test_a_request_joins_the_running_batch_at_the_next_step():
    loaded, scheduler = stub(), Scheduler(max_running=4, max_waiting=4)
    a, b = req("x", temperature=0, max_tokens=8), req("ab", temperature=0, max_tokens=10)

    async def main():
        started = asyncio.Event()

        async def first() -> Delta:
            result = Delta("")
            async for d in scheduler.stream(loaded, a):
                result.add(d)
                if result.completion_tokens == 2:
                    started.set()
            return result

        async def second() -> Delta:
            await started.wait()
            return await collect(scheduler, loaded, b)

        return await asyncio.gather(first(), second())

    out_a, out_b = run(main())
    assert outcome(out_a) == alone(loaded, a) and out_a.text == "yzxyzxyz"
    assert outcome(out_b) == alone(loaded, b) and out_b.text == "cd"
    calls = [tuple(c) for c in loaded.model.calls]
    # A alone (prefill, steps), B's prompt prefilled while A runs, then both in each step until B's EOS
    joined = calls.index((1, 2))
    assert calls[:joined] == [(1, 1)] * joined and 2 <= joined < 8
    assert calls[joined + 1:joined + 3] == [(2, 1), (2, 1)]
    assert calls[joined + 3:] == [(1, 1)] * (len(calls) - joined - 3)


def test_a_finished_row_leaves_and_its_row_goes_to_a_waiting_request():
    loaded, scheduler = stub(), Scheduler(max_running=1, max_waiting=4)
    a, b = req("x", temperature=0, max_tokens=3), req("ab", temperature=0, max_tokens=10)

    async def main():
        return await asyncio.gather(collect(scheduler, loaded, a), collect(scheduler, loaded, b))

    out_a, out_b = run(main())
    assert (out_a.text, out_a.finish_reason, out_b.text, out_b.finish_reason) == ("yzx", "length", "cd", "stop")
    # one row at a time: A's prefill and 2 steps, then B's prefill at once, then B's steps
    assert [tuple(c) for c in loaded.model.calls] == [(1, 1)] * 3 + [(1, 2), (1, 1), (1, 1)]
    assert scheduler.stats()["largest"] == 1


@pytest.mark.parametrize("how", ["aclose", "cancel_holding", "cancel_awaiting"])
def test_a_client_that_goes_away_mid_stream_frees_its_row(how):
    """Closed (aclose), or cancelled while it holds the stream (in `aclosing`, as ModelServer does) or while it
    awaits the next Delta: either way its row leaves before the next step."""
    loaded, scheduler = stub(), Scheduler(max_running=1, max_waiting=4)
    endless, waiting = req("x", temperature=0, max_tokens=60), req("a", temperature=0, max_tokens=10)

    async def main():
        got = []
        two = asyncio.Event()

        async def leaver():
            async with contextlib.aclosing(scheduler.stream(loaded, endless)) as stream:
                async for d in stream:
                    got.append(d)
                    if len(got) == 2:
                        two.set()
                        if how == "aclose":
                            await stream.aclose()
                            return
                        if how == "cancel_holding":
                            await asyncio.sleep(3600)

        task = asyncio.create_task(leaver())
        await two.wait()
        if how != "aclose":
            task.cancel()
        out = await collect(scheduler, loaded, waiting)  # gets the freed row
        await asyncio.gather(task, return_exceptions=True)
        return got, out

    got, out = run(main())
    assert "".join(d.text for d in got) == "yz" and (out.text, out.finish_reason) == ("bcd", "stop")
    calls = [tuple(c) for c in loaded.model.calls]
    assert len(calls) < 10 and calls.count((1, 1)) == len(calls)  # never 2 rows; the endless row stopped early
    assert scheduler.stats()["running"] == 0 and scheduler.stats()["waiting"] == 0


def test_complete_is_the_stream_folded_into_one_delta():
    loaded, scheduler = stub(), Scheduler(4, 4)
    requests = [req("x", temperature=0, max_tokens=5), sampled("a", 3), req("ab", temperature=0, stop=("d",))]

    async def main():
        whole = await asyncio.gather(*(scheduler.complete(loaded, r) for r in requests))
        streamed = await asyncio.gather(*(collect(scheduler, loaded, r) for r in requests))
        return whole, streamed

    whole, streamed = run(main())
    assert [outcome(d) for d in whole] == [outcome(d) for d in streamed]
    assert [d.text for d in whole] == ["yzxyz", streamed[1].text, "c"] and whole[0].token_ids[:2] == [ID["y"], ID["z"]]


def test_a_cancelled_complete_call_frees_its_row():
    """What Serve does to `ModelServer.complete` when its client disconnects."""
    loaded, scheduler = stub(), Scheduler(max_running=1, max_waiting=4)

    async def main():
        endless = asyncio.create_task(scheduler.complete(loaded, req("x", temperature=0, max_tokens=60)))
        while len(loaded.model.calls) < 3:
            await asyncio.sleep(0.001)
        endless.cancel()
        out = await scheduler.complete(loaded, req("a", temperature=0, max_tokens=10))
        return await asyncio.gather(endless, return_exceptions=True), out

    (cancelled,), out = run(main())
    assert isinstance(cancelled, asyncio.CancelledError) and (out.text, out.finish_reason) == ("bcd", "stop")
    # Left running, "x" would take its 60 steps before "a" got the one row: 60 + 4 calls. Freed, it is the
    # 3 seen + those that ran before the cancel reached the worker thread (a loaded machine runs several
    # steps per 1 ms poll) + the 4 of "a".
    assert len(loaded.model.calls) < 40 and scheduler.stats()["running"] == 0


def test_a_waiting_client_that_goes_away_leaves_the_queue():
    loaded, scheduler = stub(), Scheduler(max_running=1, max_waiting=1)

    async def waiting(n: int) -> int:  # polled, not slept: a loaded machine may take a while to get there
        for _ in range(2000):
            if scheduler.stats()["waiting"] == n:
                break
            await asyncio.sleep(0.001)
        return scheduler.stats()["waiting"]

    async def main():
        busy = asyncio.create_task(collect(scheduler, loaded, req("x", temperature=0, max_tokens=200)))
        await asyncio.sleep(0)
        stream = scheduler.stream(loaded, req("a", temperature=0, max_tokens=3))
        pending = asyncio.create_task(stream.__anext__())
        queued = await waiting(1)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        after = await waiting(0)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        return queued, after

    assert run(main()) == (1, 0)


def test_requests_beyond_the_queue_get_a_503_at_once():
    loaded, scheduler = stub(), Scheduler(max_running=1, max_waiting=1)
    long = req("x", temperature=0, max_tokens=20)

    async def main():
        first = asyncio.create_task(collect(scheduler, loaded, long))
        await asyncio.sleep(0)
        second = asyncio.create_task(collect(scheduler, loaded, req("a", temperature=0, max_tokens=5)))
        await asyncio.sleep(0)
        third = await scheduler.complete(loaded, req("a", temperature=0))  # answered before the others finish
        done_early = first.done() or second.done()
        return await first, await second, third, done_early

    first, second, third, done_early = run(main())
    assert (third.error.status, third.error.code, third.error.type) == (503, "overloaded", "server_error")
    assert "retry later" in third.error.message and not done_early
    assert (first.text, first.error, second.text, second.error) == ("yzxyzxyzxyzxyzxyzxyz", None, "bcd", None)
    assert scheduler.stats()["rejected"] == 1 and scheduler.stats()["requests"] == 2


def test_a_bad_row_fails_alone_in_a_running_batch():
    class NanOnX(BigramModel):
        """A row whose last input is "e" gets NaN logits: its draw raises."""

        def forward(self, input_ids, **kw):
            out = super().forward(input_ids, **kw)
            out.logits[input_ids[:, -1] == ID["e"]] = float("nan")
            return out

    loaded, scheduler = stub(model=NanOnX(CHAIN), tokenizer=FailingTokenizer()), Scheduler(8, 8)
    good = [req("a", temperature=0, max_tokens=6), sampled("b", 3), req("ab", temperature=0, max_tokens=2)]
    bad = [sampled("a", 2**64), sampled("e", 1), req("x", temperature=0, max_tokens=6)]  # setup, draw, decode

    async def main():
        return await asyncio.gather(*(collect(scheduler, loaded, r) for r in good[:1] + bad + good[1:]))

    outs = run(main())
    assert [o.error.status for o in outs[1:4]] == [400, 500, 500]
    assert "cannot decode z" in outs[3].error.message
    together = [outs[0]] + outs[4:]
    assert [outcome(o) for o in together] == [outcome(generate(BigramModel(CHAIN), CharTokenizer(), [r])[0])
                                              for r in good]


def test_a_failed_forward_pass_fails_its_batch_and_the_scheduler_goes_on():
    class BrokenOnce(BigramModel):
        def forward(self, input_ids, **kw):
            if input_ids.shape == (2, 1) and not getattr(self, "broke", False):
                self.broke = True
                raise RuntimeError("out of memory")
            return super().forward(input_ids, **kw)

    loaded, scheduler = stub(model=BrokenOnce(CHAIN)), Scheduler(4, 4)

    async def main():
        both = await asyncio.gather(collect(scheduler, loaded, req("x", temperature=0, max_tokens=5)),
                                    collect(scheduler, loaded, req("a", temperature=0, max_tokens=5)))
        return both, await collect(scheduler, loaded, req("a", temperature=0, max_tokens=5))

    (first, second), later = run(main())
    assert first.error.status == second.error.status == 503 and "out of memory" in first.error.message
    assert (later.text, later.error) == ("bcd", None)


def test_a_model_that_cannot_decode_fails_its_requests_and_the_scheduler_goes_on():
    loaded, scheduler = stub(), Scheduler(4, 4)
    broken = LoadedModel(object(), CharTokenizer())  # no config: no batch can be made for it

    async def main():
        return await asyncio.gather(collect(scheduler, broken, req("a", temperature=0)),
                                    collect(scheduler, loaded, req("a", temperature=0, max_tokens=5)))

    failed, served = run(main())
    assert (failed.error.status, failed.error.code) == (503, "model_unavailable")
    assert (served.text, served.error) == ("bcd", None)


def test_each_model_decodes_in_its_own_batch():
    one, other = stub(), stub(chain={"a": "x", "x": "a"})
    scheduler = Scheduler(max_running=4, max_waiting=4)

    async def main():
        return await asyncio.gather(collect(scheduler, one, req("a", temperature=0, max_tokens=5)),
                                    collect(scheduler, other, req("a", temperature=0, max_tokens=5)),
                                    collect(scheduler, one, req("x", temperature=0, max_tokens=4)))

    outs = run(main())
    assert [o.text for o in outs] == ["bcd", "xaxax", "yzxy"]
    assert max(c[0] for c in one.model.calls) == 2 and max(c[0] for c in other.model.calls) == 1
    assert scheduler.batches == {}  # idle models' batches are gone


def test_decoding_does_not_block_the_event_loop():
    class Slow(BigramModel):
        def forward(self, input_ids, **kw):
            time.sleep(0.05)
            return super().forward(input_ids, **kw)

    loaded, scheduler = stub(model=Slow(CHAIN)), Scheduler(2, 2)

    async def main():
        ticks = 0
        decoding = asyncio.create_task(collect(scheduler, loaded, req("x", temperature=0, max_tokens=8)))
        while not decoding.done():
            await asyncio.sleep(0.005)
            ticks += 1
        return ticks, await decoding

    ticks, out = run(main())
    assert out.completion_tokens == 8 and ticks >= 20  # 8 forward passes of 50 ms: the loop ticked meanwhile


def test_a_scheduler_serves_a_new_event_loop():
    """asyncio.run twice (as the fuzz test does per group): the decoding task starts again in the new loop."""
    loaded, scheduler = stub(), Scheduler(2, 2)
    for _ in range(2):
        assert run(collect(scheduler, loaded, req("a", temperature=0, max_tokens=5))).text == "bcd"


def test_scheduler_limits_must_make_sense():
    for bad in ((0, 1), (1, -1)):
        with pytest.raises(ValueError):
            Scheduler(*bad)
