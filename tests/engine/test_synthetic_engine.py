"""The SYNTHETIC engine: exact echo, pacing like a batched engine's steps, queueing, abort,
pause and resume. On the fake clock (``tests.fake_clock``): timers fire exactly when due, so
pacing is checked exactly and a loaded machine cannot shift it."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.fake_clock import on_fake_clock
from tokenspout.engine.continuation import Continuation
from tokenspout.engine.request import ChatMessage, EngineOutput, Prompt, SamplingParams
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.errors import InvalidRequestError, NothingLeftError


async def collect(engine: SyntheticEngine, rid: str, prompt: str, n: int) -> list[EngineOutput]:
    loop = asyncio.get_running_loop()
    outs = []
    async for out in engine.generate(rid, engine.encode_completion(prompt), SamplingParams(n)):
        outs.append((loop.time(), out))
    return outs  # type: ignore[return-value]


@on_fake_clock
async def test_echoes_words_for_exactly_max_tokens() -> None:
    engine = SyntheticEngine()
    outs = [o for _, o in await collect(engine, "a", "one two three", 7)]  # type: ignore[misc]
    assert "".join(o.text for o in outs) == "one two three one two three one "
    assert [o.num_tokens for o in outs] == [1] * 7
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 7
    assert all(o.finish_reason is None for o in outs[:-1])
    assert engine.stats().running == 0 and engine.stats().generation_tokens_total == 7


@pytest.mark.parametrize(
    ("stop", "text", "reason", "tokens"),
    [
        (("two",), "one ", "stop", 2),  # cut before it; the stop string's token counts
        (("o t",), "one tw", "stop", 3),  # across two tokens: "two " holds back "o "
        (("zz", "e o"), "one two thre", "stop", 4),  # the first of several to appear
        (("one two three one x",), "one two three one two ", "length", 5),  # held, released
    ],
)
@on_fake_clock
async def test_stop_strings_cut_the_text_before_them(
    stop: tuple[str, ...], text: str, reason: str, tokens: int
) -> None:
    engine = SyntheticEngine()
    prompt = engine.encode_completion("one two three")
    params = SamplingParams(5, stop=stop)
    outs = [out async for out in engine.generate("s", prompt, params)]
    assert "".join(o.text for o in outs) == text
    assert outs[-1].finish_reason == reason and outs[-1].completion_tokens == tokens
    assert engine.stats().running == 0


def test_stop_token_ids_are_refused_by_name() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SyntheticEngine().check_params(SamplingParams(5, stop_token_ids=(3,)))
    assert info.value.param == "stop_token_ids"


@on_fake_clock
async def test_first_token_after_ttft_then_a_step_apart() -> None:
    engine = SyntheticEngine(ttft_ms=40, itl_ms=20)
    start = asyncio.get_running_loop().time()
    timed = await collect(engine, "a", "w", 5)
    times = [t for t, _ in timed]  # type: ignore[misc]
    assert times[0] - start == pytest.approx(0.040)
    assert times[1] - times[0] == pytest.approx(0.020)  # joins the steps a whole itl later
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert gaps == pytest.approx([0.020] * 3)


@on_fake_clock
async def test_concurrent_requests_share_steps() -> None:
    engine = SyntheticEngine(itl_ms=10)
    loop = asyncio.get_running_loop()
    times: dict[str, list[float]] = {"a": [], "b": []}
    ended = {rid: asyncio.Event() for rid in times}

    def sink(rid: str, out: EngineOutput) -> None:
        times[rid].append(loop.time())
        if out.finish_reason is not None:
            ended[rid].set()

    for rid in times:
        engine.submit(
            rid, engine.encode_completion("x"), SamplingParams(6), lambda o, r=rid: sink(r, o)
        )
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ended.values())), 10)
    # After joining, every step gives both requests their token in the same callback
    # (steps are 10 ms apart; the two sink calls are microseconds apart).
    for t in times["a"][2:]:
        assert min(abs(t - u) for u in times["b"]) < 0.002


@on_fake_clock
async def test_queue_beyond_max_num_seqs_and_abort_frees_the_slot() -> None:
    engine = SyntheticEngine(itl_ms=5, max_num_seqs=1)
    got: list[EngineOutput] = []
    engine.submit("a", engine.encode_completion("x"), SamplingParams(1000), got.append)
    queued: list[EngineOutput] = []
    engine.submit("b", engine.encode_completion("y"), SamplingParams(3), queued.append)
    assert (engine.stats().running, engine.stats().waiting) == (1, 1)
    await asyncio.sleep(0.03)
    assert not queued and got
    assert engine.abort("a")
    assert got[-1].finish_reason == "cancelled"
    assert not engine.abort("a")
    for _ in range(100):
        if queued and queued[-1].finish_reason:
            break
        await asyncio.sleep(0.01)
    assert "".join(o.text for o in queued) == "y y y "
    assert engine.stats().running == 0


@on_fake_clock
async def test_abort_while_queued_never_starts() -> None:
    engine = SyntheticEngine(itl_ms=5, max_num_seqs=1)
    engine.submit("a", engine.encode_completion("x"), SamplingParams(50), lambda o: None)
    queued: list[EngineOutput] = []
    engine.submit("b", engine.encode_completion("y"), SamplingParams(3), queued.append)
    assert engine.abort("b")
    assert [o.finish_reason for o in queued] == ["cancelled"]
    assert engine.stats().waiting == 0
    engine.abort("a")


@on_fake_clock
async def test_pause_holds_tokens_and_resume_continues() -> None:
    engine = SyntheticEngine(itl_ms=2)
    got: list[EngineOutput] = []
    engine.submit("a", engine.encode_completion("x"), SamplingParams(100), got.append)
    await asyncio.sleep(0.02)
    engine.pause("a")
    held = len(got)
    await asyncio.sleep(0.03)
    assert len(got) == held
    held = len(got)
    engine.resume("a")
    await asyncio.sleep(0.03)
    assert len(got) > held
    engine.abort("a")


@on_fake_clock
async def test_zero_itl_gives_one_token_per_loop_turn() -> None:
    engine = SyntheticEngine()
    got: list[EngineOutput] = []
    engine.submit("a", engine.encode_completion("x"), SamplingParams(5), got.append)
    counts = []
    for _ in range(8):
        await asyncio.sleep(0)
        counts.append(len(got))
    assert counts[-1] == 5
    assert all(b - a <= 1 for a, b in itertools.pairwise(counts))


@pytest.mark.parametrize(
    ("words", "echo"),
    [
        ("a b c", "a b c a b c a "),
        ("a b a", "b a b a b a b "),
        ("a a b", "a a b a a b a "),
        ("solo", "solo " * 7),
    ],
)
@on_fake_clock
async def test_words_go_on_with_their_smallest_period(words: str, echo: str) -> None:
    outs = [o for _, o in await collect(SyntheticEngine(), "a", words, 7)]  # type: ignore[misc]
    assert "".join(o.text for o in outs) == echo


async def answer(engine: SyntheticEngine, prompt: Prompt, params: SamplingParams) -> str:
    return "".join([o.text async for o in engine.generate("r", prompt, params)])


@pytest.mark.parametrize("words", ["one two three", "a b a", "x x y x", "w"])
@pytest.mark.parametrize("cut", [1, 4, 9])
@on_fake_clock
async def test_continuation_gives_the_rest_of_the_uncut_answer(words: str, cut: int) -> None:
    engine = SyntheticEngine()
    params = SamplingParams(12)
    for prompt in (
        engine.encode_completion(words),
        engine.encode_chat([ChatMessage("system", "be brief"), ChatMessage("user", words)]),
    ):
        whole = await answer(engine, prompt, params)
        first = "".join(word + " " for word in whole.split()[:cut])
        rest_prompt, rest_params = engine.continuation(
            prompt, params, Continuation(first, None, cut)
        )
        assert rest_params.max_tokens == 12 - cut
        assert first + await answer(engine, rest_prompt, rest_params) == whole


@on_fake_clock
async def test_chat_continues_its_final_assistant_message() -> None:
    # What an upstream's failover sends: the messages plus the answer so far, continued.
    engine = SyntheticEngine()
    asked = [ChatMessage("user", "red green blue")]
    whole = await answer(engine, engine.encode_chat(asked), SamplingParams(8))
    first = "red green blue red "
    assert whole.startswith(first)
    continued = engine.encode_chat(
        [*asked, ChatMessage("assistant", first)],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert first + await answer(engine, continued, SamplingParams(4)) == whole


def test_continuation_refuses_when_nothing_is_left() -> None:
    engine = SyntheticEngine()
    prompt = engine.encode_completion("a b")
    with pytest.raises(NothingLeftError, match="nothing is left"):
        engine.continuation(prompt, SamplingParams(2), Continuation("a b ", None, 2))


def test_continue_final_message_needs_an_assistant_message_and_no_generation_prompt() -> None:
    engine = SyntheticEngine()
    with pytest.raises(InvalidRequestError, match="assistant") as err:
        engine.encode_chat(
            [ChatMessage("user", "hi")], add_generation_prompt=False, continue_final_message=True
        )
    assert err.value.param == "continue_final_message"
    with pytest.raises(InvalidRequestError, match="cannot both be true"):
        engine.encode_chat(
            [ChatMessage("user", "hi"), ChatMessage("assistant", "hi")],
            continue_final_message=True,
        )


@pytest.mark.parametrize("timing", ["ttft_ms", "itl_ms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_timings_that_cannot_pace_are_refused(timing: str, value: float) -> None:
    # NaN passed a "< 0" check, and every request then failed or hung; `serve` turns
    # this ValueError into one line and exit 2.
    flag = f"--synthetic-{timing.replace('_', '-')}"
    with pytest.raises(ValueError, match=flag):
        SyntheticEngine(**{timing: value})
