"""One request's life against the upstreams: pick one, send, relay its chunks, and on a
failure try again elsewhere.

* Before the first chunk with output (connect error, 5xx, 429, 401 or 403, a status
  neither 200 nor 4xx, none within ``first_token_timeout_s``; a chat's opening chunk,
  which has only the role and which vLLM and tokenspout send before any token, is none)
  the request is sent again to another healthy upstream, up to ``retries`` times, after a
  backoff with jitter (at least a 429's ``Retry-After``). The client's stream has only
  heartbeats meanwhile. A 401 or 403 refuses tokenspout's own key for that upstream (the
  client's is never forwarded): it counts against the upstream's health like a 5xx, and
  its text is logged, not passed on. Another 4xx is the client's own fault and ends the
  request with that status and the upstream's message (a continuation's 4xx is not: it is
  an upstream's failure as below).
* After it (the connection cut, no chunk for ``stall_timeout_s``, a malformed chunk, a
  finish reason that says the upstream gave up: vLLM's ``abort``, ``_CUT_REASONS``) the
  answer goes on elsewhere from where it stands: ``Engine.continuation`` gives the prompt
  followed by the text so far and what is left of ``max_tokens``, so the client's stream
  has no duplicated and no lost text, and the usage counts both parts. "After" means once
  the client has had anything (text, a tool call's piece, a logprob).
* A stream that has carried part of a tool call is neither continued (an upstream cannot
  resume half a call's arguments reliably) nor sent again (the client would get the call
  twice): it ends at once with a ``tool_call_interrupted`` error, after the pieces the
  client already had, never with silently shortened arguments.
* So does a stream that has carried reasoning (``reasoning_interrupted``) or a refusal
  (``refusal_interrupted``): a continuation's prompt holds the answer's content only, as
  an assistant message to go on with; there is no field for the reasoning so far, and an
  upstream's reasoning parser may take the continued text for reasoning anyway (vLLM's
  DeepSeek-R1 parser reads everything before ``</think>`` as reasoning, the ``<think>``
  being in the prompt). Going on without it would stream a second, unrelated reasoning
  or an answer that never saw the first; sending the request again would repeat what the
  client already has. An error that says so is what the client can act on.
* ``cancel`` (the client left, cancel by id, send timeout, drain) cancels the task, which
  closes the upstream response at once: the upstream aborts the generation on disconnect.
  A request cancelled while it waits for an upstream is never sent.

Each upstream chunk with content (reasoning and refusals too: the upstream counts them as
generated tokens) is one output per token it holds (the upstream's running count, or a token
per logprob when that is more: llama.cpp gives a character of several tokens one logprobs
entry; one without either), its text with the first token that has a logprob, else with its
last (tokenspout's flush policy coalesces them); what is left of ``max_tokens``
after a cut counts these, exact for upstreams that give a count or send a chunk per token
(vLLM, llama.cpp, tokenspout, which is asked to). A max_tokens left out upstream
(``request_body``) is this relay's to enforce: the answer ends with ``length`` at the last
chunk within it; a chunk of several tokens that would go past it is left out whole (its text
cannot be cut between its tokens), so such an answer may be a few tokens short of
max_tokens, never longer, and its usage counts the tokens whose text the client has. One
that was sent is enforced too, against an upstream that ignores it: its first chunk past it
ends the answer the same way (``length``, the upstream response closed). Prompt
tokens are known from the upstream's usage: along the stream from one that sends it in every
chunk, else at the last output only; an answer whose last usage never came (cut after its
end, cancelled) keeps what was said before (0 when nothing was: tokenspout does not tokenize
for an upstream). An echoed completion's first chunk begins with the prompt (and its tokens'
logprobs): that is no part of the answer, neither counted nor continued, and a continuation
does not ask for the echo again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenspout.engine.continuation import Continuation
from tokenspout.engine.interface import OutputSink
from tokenspout.engine.request import (
    EngineOutput,
    FinishReason,
    OutputExtras,
    Prompt,
    SamplingParams,
    TokenLogprob,
)
from tokenspout.engine.stall_clock import StallClock
from tokenspout.engine.upstream_body import encode, request_body
from tokenspout.engine.upstream_chunks import (
    MalformedChunkError,
    ToolCallSlots,
    UpstreamChunk,
    error_object,
    parse_chunk,
)
from tokenspout.engine.upstream_metrics import FAILOVER_REASONS, UpstreamMetrics
from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_pool import UpstreamPool
from tokenspout.engine.upstream_server import UpstreamServer
from tokenspout.errors import EngineError, UpstreamError
from tokenspout.protocols.sse_decoder import EventTooLargeError, SSEDataDecoder

logger = logging.getLogger(__name__)

#: Builds the request for the rest of an answer (``Engine.continuation``).
ContinueWith = Callable[[Prompt, SamplingParams, Continuation], tuple[Prompt, SamplingParams]]

#: How long the end of a body may take after the answer's end (``[DONE]``, or its usage)
#: before its connection is closed.
_READ_TO_END_S = 1.0

#: The upstream's finish reasons passed on as they are; any other that is not a cut (a
#: vendor's own name for a normal end: TGI's eos_token and stop_sequence) is a stop.
_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "tool_calls", "content_filter"})

#: Finish reasons that say the upstream gave up on the answer, not that it ended: vLLM's
#: abort and error (sent with a 200 and [DONE] when its engine aborts the request or shuts
#: down), Mistral's and OpenRouter's error, DeepSeek's insufficient_system_resource, an
#: inner tokenspout's cancelled (its drain, a cancel by id). The answer is then cut: it
#: goes on elsewhere as a cut stream's does, never ends as whole.
_CUT_REASONS: frozenset[str] = frozenset(
    {"abort", "error", "cancelled", "insufficient_system_resource"}
)


@dataclass
class _Failed(Exception):
    """An upstream failed this request in a way another upstream may not."""

    #: Metric label: connect_error, timeout, 429, 401, 403, 5xx status, cut, stall, malformed.
    status: str
    #: What happened, for the log and the client's error (addresses only, no key).
    why: str
    retry_after_s: float = 0.0
    #: The upstream is at fault (passive health): connect errors, 5xx, 401 and 403.
    eject: bool = False


@dataclass
class _Part:
    """One upstream's part of the answer: where it started, how it said it ended."""

    tokens_before: int
    finish: str | None = None
    usage: tuple[int, int] | None = None
    #: It has sent some of the answer (``UpstreamChunk.output``).
    output: bool = False
    #: The prompt's tokens as a chunk without usage said (llama.cpp's timings).
    prompt_said: int | None = None
    #: This relay ended it at ``max_tokens`` (which the upstream was not sent, or ignored).
    capped: bool = False
    #: Its tool calls so far, for the pieces that leave out their index.
    calls: ToolCallSlots = field(default_factory=ToolCallSlots)

    @property
    def prompt_tokens(self) -> int:
        """The request's prompt tokens, once the upstream has said (its usage, or its
        timings before that; 0 before either): a continuation's prompt holds the answer's
        tokens before it, which come off."""
        said = self.usage[0] if self.usage is not None else self.prompt_said
        return 0 if said is None else max(0, said - self.tokens_before)


@dataclass
class UpstreamRelay:
    """See the module docstring. ``run`` is the request's task."""

    request_id: str
    prompt: Prompt
    params: SamplingParams
    sink: OutputSink
    pool: UpstreamPool
    options: UpstreamOptions
    metrics: UpstreamMetrics
    continuation: ContinueWith
    #: Text generated and delivered so far (not an echoed prompt), and tokens delivered so far.
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    #: The client has had the prompt's echo (a completion's ``echo``): a continuation does
    #: not echo it again.
    echoed: bool = False
    #: The request's prompt tokens, as the latest usage from an upstream said (0 before):
    #: an answer whose last usage never came (cut after its end, cancelled) keeps them.
    prompt_tokens: int = 0
    #: An upstream has accepted the request (answered 200): the sink was told.
    accepted: bool = False
    #: The sink has had its last item.
    finished: bool = False
    #: Set unless the stream asked to hold this request (backpressure).
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: What the client has had that a continuation cannot go on with (a tool call's piece,
    #: reasoning, a refusal): a cut then ends the request (``_cut_error``).
    _cannot_continue: str | None = None
    #: The current upstream has sent its first chunk with output (a timeout is then a stall).
    _first_seen: bool = False
    #: What the current upstream's answer has said so far.
    _part: _Part | None = None

    @property
    def answering(self) -> bool:
        """The client has had some of the answer (an echo too): what is left of it is
        continued elsewhere, never asked for again from its start."""
        return self.tokens > 0 or self.echoed

    def start(self) -> None:
        self.flowing.set()
        self.task = asyncio.create_task(self.run(), name=f"tokenspout-upstream-{self.request_id}")

    def cancel(self) -> bool:
        """Stop now: the upstream's response is closed, or the request never sent."""
        if self.finished:
            return False
        assert self.task is not None
        self.task.cancel()
        self._emit(EngineOutput("", 0, self.prompt_tokens, self.tokens, "cancelled"), last=True)
        return True

    async def run(self) -> None:
        try:
            await self._relay()
        except EngineError as err:
            self._emit(err, last=True)
        except Exception as exc:
            logger.exception("upstream relay of %s failed", self.request_id)
            self._emit(EngineError(f"relaying the upstream's answer failed: {exc}"), last=True)

    async def _relay(self) -> None:
        failed: list[UpstreamServer] = []
        model = self.params.model or ""
        while True:
            server = await self.pool.acquire(model, failed)
            try:
                await self._attempt(server)
                return
            except _Failed as f:
                retry_after_s = f.retry_after_s
                if f.eject:
                    self.pool.failed(server, f.why)
                self.metrics.requests.labels(server.address, f.status).inc()
                if self._cannot_continue is not None:
                    raise _cut_error(self._cannot_continue, server, f) from None
                if len(failed) >= self.options.retries:
                    raise self._gave_up(server, f) from None
                failed.append(server)
                if self.answering:
                    reason = f.status if f.status in FAILOVER_REASONS else "upstream_error"
                    self.metrics.failovers.labels(reason, server.address).inc()
                else:
                    self.metrics.retries.labels(server.address).inc()
                logger.warning(
                    "request %s: upstream %s failed (%s); trying another (%d of %d)",
                    self.request_id,
                    server.address,
                    f.why,
                    len(failed),
                    self.options.retries,
                )
            finally:
                self.pool.release(server)
            await asyncio.sleep(self._backoff(len(failed), retry_after_s))

    def _backoff(self, tries: int, retry_after_s: float) -> float:
        if self.answering and tries == 1 and not retry_after_s:
            # The client is mid-answer: the first failover goes to another upstream at once
            # (backing off is for not hammering the same one).
            return 0.0
        base = self.options.backoff_s * 2 ** (tries - 1)
        return max(base * (1 + random.random()), min(retry_after_s, self.options.max_retry_after_s))

    def _gave_up(self, server: UpstreamServer, f: _Failed) -> UpstreamError:
        if self.answering:
            return UpstreamError(
                f"the answer was cut ({f.why} at {server.address}) and no upstream could "
                f"continue it",
                status_code=502,
                code="upstream_failed",
            )
        if f.status == "429":
            # Every upstream is busy: the client may come back when the last one said.
            return UpstreamError(
                f"no upstream could answer: {f.why} at {server.address}",
                status_code=429,
                type="rate_limit_error",
                code="upstream_rate_limited",
                retry_after_s=max(1, math.ceil(f.retry_after_s)),
            )
        status = {"timeout": 504, "connect_error": 503}.get(f.status, 502)
        return UpstreamError(
            f"no upstream could answer: {f.why} at {server.address}",
            status_code=status,
            code="upstream_timeout" if status == 504 else "upstream_unavailable",
        )

    async def _attempt(self, server: UpstreamServer) -> None:
        prompt, params = self.prompt, self.params
        if self.answering:
            if self.tokens >= params.max_tokens:
                self._finish("length", None)
                return
            sofar = Continuation("".join(self.parts), None, self.tokens)
            prompt, params = self.continuation(prompt, params, sofar)
        path, body = request_body(prompt, params, server.token_counts)
        self._part = None
        sent_at = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.options.first_token_timeout_s) as timer:
                response = await server.post(path, encode(body), _headers(prompt))
                try:
                    await self._check_status(server, response)
                    await self._read(server, response, timer, sent_at)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TransportError) as exc:
            if self._part is not None and self._part.finish is not None:
                # The answer was whole; only its usage or [DONE] went missing.
                self._finish_part(server)
                return
            raise self._failure(exc) from None
        except (MalformedChunkError, EventTooLargeError) as exc:
            raise _Failed("malformed", f"it sent {exc}") from None
        except asyncio.CancelledError:
            self.metrics.requests.labels(server.address, "cancelled").inc()
            raise

    def _failure(self, exc: Exception) -> _Failed:
        """What a timeout or a transport error while asking an upstream means."""
        if isinstance(exc, TimeoutError):
            if self._first_seen:
                return _Failed("stall", f"no chunk for {self.options.stall_timeout_s} s")
            return _Failed(
                "timeout", f"no first chunk within {self.options.first_token_timeout_s} s"
            )
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return _Failed("connect_error", f"cannot connect ({_why(exc)})", eject=True)
        return _Failed("cut", f"the connection was cut ({type(exc).__name__})")

    async def _check_status(self, server: UpstreamServer, response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            _require_sse(response)
            server.succeeded()
            if not self.accepted:
                # The request is not refused: the client's response may begin (refuses_late).
                self.accepted = True
                self._emit(EngineOutput("", 0, self.prompt_tokens, 0))
            return
        await response.aread()
        if status == 429:
            why = _with_message("429 Too Many Requests", server, response)
            raise _Failed("429", why, retry_after_s=_retry_after(response))
        if status >= 500:
            why = _with_message(f"status {status}", server, response)
            raise _Failed(str(status), why, eject=True)
        if status < 400:
            # Not an answer (a 204, a redirect): no status of the client's request either,
            # and a 204 passed on with a body would break the client's connection.
            raise _Failed(str(status), f"status {status}, not a stream")
        if status in (401, 403):
            # The client's Authorization is never forwarded: what was refused is this
            # upstream's key (--upstream-api-key), not the client's. Its text may quote that
            # key (masked): for the operator's log only.
            logger.warning(
                "upstream %s refused tokenspout's credentials (status %d): %r",
                server.address,
                status,
                response.text[:500],
            )
            why = f"status {status}: it refused tokenspout's credentials (--upstream-api-key)"
            raise _Failed(str(status), why, eject=True)
        server.succeeded()
        refused = _refused(server, response)
        if self.answering:
            # The client's request was accepted: what was refused is the continuation,
            # tokenspout's own request, which another upstream may take.
            raise _Failed(str(status), f"status {status} for the continuation ({refused.message})")
        self.metrics.requests.labels(server.address, str(status)).inc()
        raise refused

    async def _read(
        self,
        server: UpstreamServer,
        response: httpx.Response,
        timer: asyncio.Timeout,
        sent_at: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._first_seen = False
        part = self._part = _Part(self.tokens)
        stall = StallClock(timer, self.options.stall_timeout_s, loop)
        decoder = SSEDataDecoder()
        body = _body(response)
        done = False
        try:
            # Whatever one read brought, at once: under load one read holds several chunks.
            async for data in body:
                payloads = decoder.feed(data)
                if not payloads:
                    continue
                done = self._take(payloads, part)
                if part.output and not self._first_seen:
                    self._first_seen = True
                    self.metrics.ttft.labels(server.address).observe(loop.time() - sent_at)
                    stall.start()
                if done:
                    break  # [DONE], max_tokens or a whole answer
                server.streaming = True
                if not self._first_seen:
                    # Only a chat's opening role so far: the first-token timeout runs on,
                    # and nothing was delivered that backpressure would hold.
                    continue
                stall.beat()
                if not self.flowing.is_set():
                    # Held by backpressure: the stall clock stops meanwhile, and TCP's own
                    # flow control holds the upstream back.
                    stall.stop()
                    await self.flowing.wait()
                    stall.start()
        finally:
            stall.stop()
        if part.finish is None:
            raise _Failed("cut", "the stream ended before the answer did")
        self._finish_part(server)
        if done and not part.capped:
            # Not when this relay ended the answer: closing the response stops the upstream.
            await _read_to_end(body)

    def _take(self, payloads: list[bytes], part: _Part) -> bool:
        """Relay the chunks of one read; True at ``[DONE]``, at ``max_tokens``, or once the
        answer is whole (what follows is ignored)."""
        for payload in payloads:
            if payload == b"[DONE]":
                return True
            chunk = parse_chunk(payload, part.calls)
            if chunk.usage is not None:
                part.usage = chunk.usage
                self.prompt_tokens = part.prompt_tokens
            elif chunk.prompt_tokens is not None and part.prompt_said is None:
                part.prompt_said = chunk.prompt_tokens
                self.prompt_tokens = part.prompt_tokens
            if self._past_max_tokens(chunk, part):
                part.finish, part.capped = "length", True
                return True
            self._deliver(chunk, part)
            if chunk.finish_reason in _CUT_REASONS:
                raise _Failed("cut", f"it ended the answer with {chunk.finish_reason!r}")
            part.finish = chunk.finish_reason or part.finish
            part.output = part.output or chunk.output
            if part.finish is not None and chunk.usage is not None:
                # Whole: its finish, and the usage that was asked for (in the finish chunk
                # or after it). An upstream that never sends [DONE] or ends its body would
                # otherwise hold the end until the stall timeout.
                return True
            if self._reached_max_tokens(part):
                part.finish, part.capped = "length", True
                return True
        return False

    def _reached_max_tokens(self, part: _Part) -> bool:
        """A max_tokens left out upstream (``request_body``) is reached here. One that was
        sent is the upstream's to end at, with its finish chunk and usage, which may come
        after the last token's chunk (OpenAI, llama.cpp): only a chunk past it ends the
        answer here (``_past_max_tokens``)."""
        params = self.params
        return (
            not params.max_tokens_given
            and part.finish is None
            and (self.tokens >= params.max_tokens)
        )

    def _past_max_tokens(self, chunk: UpstreamChunk, part: _Part) -> bool:
        """``chunk`` would take the answer past max_tokens: an upstream that ignores the
        max_tokens it was sent, or one that was not sent it whose chunk holds several
        tokens (it coalesces; its text, which goes with its last token, cannot be cut
        between them). The answer ends before it, so that its usage never says more than
        max_tokens and counts exactly the tokens whose text the client has. An echo's first
        chunk (the prompt and the first token) is delivered whole."""
        params = self.params
        if params.echo and not self.echoed:
            return False
        if not any((chunk.text, chunk.logprobs, chunk.tool_calls, chunk.reasoning, chunk.refusal)):
            return False  # no token of its own to deliver (a finish, the usage)
        # What ``_deliver`` counts: a token per logprob, or the upstream's count when more.
        tokens = max(len(chunk.logprobs), self._count(chunk, part))
        return self.tokens + tokens > params.max_tokens

    def _finish_part(self, server: UpstreamServer) -> None:
        part = self._part
        assert part is not None and part.finish is not None
        self.metrics.requests.labels(server.address, "200").inc()
        self._finish(part.finish, part)

    def _deliver(self, chunk: UpstreamChunk, part: _Part) -> None:
        # The stream counts the prompt's tokens from the first output that has them (the
        # request log, usage sent along), not only from the last.
        prompt = part.prompt_tokens
        if self.params.echo and not self.echoed and chunk.text:
            self._deliver_echo(chunk, part)
            return
        if not (chunk.tool_calls or chunk.logprobs or chunk.reasoning or chunk.refusal):
            if chunk.text:  # the usual chunk: text, nothing else
                self._skip_tokens(self._count(chunk, part) - 1, prompt)
                self.tokens += 1
                self.parts.append(chunk.text)
                self._emit(EngineOutput(chunk.text, 1, prompt, self.tokens))
            return
        if self._cannot_continue is None:
            if chunk.tool_calls:
                self._cannot_continue = "tool_call"
            elif chunk.refusal:
                self._cannot_continue = "refusal"
            elif chunk.reasoning:
                self._cannot_continue = "reasoning"
        if chunk.logprobs:
            # Tokens the upstream counted beyond its logprobs, without text or logprob of
            # their own: llama.cpp sends a character of several tokens as one chunk with one
            # logprobs entry, its ``predicted_n`` counting them all.
            self._skip_tokens(self._count(chunk, part) - len(chunk.logprobs), prompt)
        logprobs = chunk.logprobs or (None,)
        for i, logprob in enumerate(logprobs):
            if i == 0:  # the chunk's text and pieces go with its first token
                text = chunk.text
                extras = OutputExtras(
                    logprob, chunk.tool_calls, reasoning=chunk.reasoning, refusal=chunk.refusal
                )
            else:
                text, extras = "", OutputExtras(logprob)
            if logprob is None:  # else a logprob is a token
                self._skip_tokens(self._count(chunk, part) - 1, prompt)
            self.tokens += 1
            if text:
                self.parts.append(text)
            self._emit(EngineOutput(text, 1, prompt, self.tokens, None, extras))

    def _skip_tokens(self, n: int, prompt_tokens: int) -> None:
        """``n`` tokens without text of their own: the first of a chunk into which the
        upstream coalesced several (another tokenspout does), whose text goes with the last.
        One output per token, so that the stream's positions (its event ids, the count in
        the ``[DONE]`` event's id) count tokens here as they do from the embedded engine."""
        for _ in range(n):
            self.tokens += 1
            self._emit(EngineOutput("", 1, prompt_tokens, self.tokens))

    def _deliver_echo(self, chunk: UpstreamChunk, part: _Part) -> None:
        """The first chunk of an echoed completion: the prompt's text (and, with logprobs,
        its tokens' logprobs) and then the first generated token(s), as vLLM and tokenspout
        send it. It goes to the client as the embedded engine's first output does (the
        prompt's logprobs as ``prompt_logprobs``); only what was generated counts as
        tokens and is the text a continuation continues."""
        self.echoed = True
        echo = self.prompt.text
        # An upstream whose echo is not the prompt as sent: the chunk is taken as echo alone.
        generated = chunk.text[len(echo) :] if chunk.text.startswith(echo) else ""
        logprobs = chunk.logprobs
        if logprobs:
            # The usage along the stream says how many tokens the prompt has; else they are
            # the first ones whose bytes make up its text.
            k = chunk.usage[0] if chunk.usage is not None else _covering(logprobs, echo)
            said, logprobs = logprobs[:k], logprobs[k:]
            n = 1 if logprobs else 0
            extras = OutputExtras(logprobs[0] if logprobs else None, prompt_logprobs=said)
            logprobs = logprobs[1:]
        elif chunk.generated is not None:
            n = max(part.tokens_before + chunk.generated - self.tokens, 0)
            if n > 1:
                self._skip_tokens(n - 1, part.prompt_tokens)
                n = 1
            extras = None
        else:
            n = 1 if generated else 0
            extras = None
        self.tokens += n
        if generated:
            self.parts.append(generated)
        self._emit(EngineOutput(chunk.text, n, part.prompt_tokens, self.tokens, None, extras))
        for logprob in logprobs:
            self.tokens += 1
            self._emit(
                EngineOutput("", 1, part.prompt_tokens, self.tokens, None, OutputExtras(logprob))
            )

    def _count(self, chunk: UpstreamChunk, part: _Part) -> int:
        """The tokens a chunk of ``part`` with output accounts for: the upstream's own count
        when it gives one (several when it coalesced them), else one."""
        if chunk.generated is None:
            return 1
        return max(part.tokens_before + chunk.generated - self.tokens, 1)

    def _finish(self, finish: str, part: _Part | None) -> None:
        """The last output: the finish reason and the usage of all parts. The last part's
        upstream reports its usage; a cut part's tokens are its outputs counted here, and
        a continuation's prompt holds them, so they come off its prompt tokens."""
        prompt, completion = self.prompt_tokens, self.tokens
        if part is not None and part.usage is not None and not part.capped:
            # Not for a part this relay ended: its usage may count a chunk left out at
            # max_tokens.
            completion = part.tokens_before + part.usage[1]
        # The tokens the usage counts that no chunk carried (an end of text, EOS; those
        # whose text a stop string took): one output each, the last output the last of them
        # (as the embedded engine's last output is its last token), so that the stream's
        # position (the ids, the seed's [DONE]) is the count of tokens generated: a position
        # is an output, whatever its num_tokens.
        last = 1 if completion > self.tokens else 0
        self._skip_tokens(completion - self.tokens - last, prompt)
        self.tokens += last
        reason: FinishReason = finish if finish in _FINISH_REASONS else "stop"  # type: ignore[assignment]
        self._emit(EngineOutput("", last, prompt, completion, reason), last=True)

    def _emit(self, item: EngineOutput | EngineError, *, last: bool = False) -> None:
        if self.finished:
            return
        self.finished = last
        try:
            self.sink(item)
        except Exception:
            # A sink must not raise (the contract); if one does, only its request ends.
            logger.exception("upstream relay: the sink of %s raised; dropping it", self.request_id)
            if not last:
                self.cancel()


def _covering(logprobs: tuple[TokenLogprob, ...], text: str) -> int:
    """How many of ``logprobs``' first tokens make up ``text`` (by their bytes)."""
    need, have = len(text.encode()), 0
    for i, logprob in enumerate(logprobs):
        if have >= need:
            return i
        have += len(logprob.bytes)
    return len(logprobs)


def _body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response's body as it arrives: the raw bytes when they are not compressed (each
    of ``aiter_bytes``'s decoding layers costs CPU per chunk)."""
    if response.headers.get("content-encoding", "identity") == "identity":
        return response.aiter_raw()
    return response.aiter_bytes()


async def _read_to_end(body: AsyncIterator[bytes]) -> None:
    """After the answer's end (the client has had it already), the body's last bytes: its
    ``[DONE]`` and end of chunks usually come next, and a response read to its end leaves
    its connection to the next request, which then needs no new one. Bounded; whatever
    goes wrong here is ignored (the answer was whole)."""
    try:
        async with asyncio.timeout(_READ_TO_END_S):
            async for _ in body:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass


def _headers(prompt: Prompt) -> dict[str, str]:
    """The request's headers: JSON, and the request's trace context when it has one (W3C
    Trace Context: the upstream's work becomes a child of tokenspout's request span)."""
    if prompt.traceparent is None:
        return {"Content-Type": "application/json"}
    return {"Content-Type": "application/json", "traceparent": prompt.traceparent}


def _cut_error(kind: str, server: UpstreamServer, f: _Failed) -> UpstreamError:
    """The error of an answer cut after something no continuation can go on with
    (``kind``: tool_call, reasoning or refusal; see the module docstring)."""
    where = f"{f.why} at {server.address}"
    if kind == "tool_call":
        message = (
            f"the answer was cut in the middle of a tool call ({where}); a tool call cannot "
            "be continued on another upstream, so its arguments are incomplete"
        )
    else:
        message = (
            f"the answer was cut after the model's {kind} had begun ({where}); a continuation "
            f"on another upstream cannot carry the {kind} so far, so the answer is incomplete"
        )
    return UpstreamError(
        f"{message}: send the request again", status_code=502, code=f"{kind}_interrupted"
    )


def _require_sse(response: httpx.Response) -> None:
    """A 200 that is not a stream (a whole JSON answer) fails the upstream before the
    request counts as accepted: the client's status is then still to come (a 502 when no
    other upstream streams it)."""
    content_type = response.headers.get("content-type", "")
    if "text/event-stream" not in content_type:
        raise _Failed("cut", f"it answered {content_type or 'no content type'!r}, not SSE")


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:  # an HTTP date: not worth parsing for a short wait
        return 1.0


def _error(response: httpx.Response) -> dict[str, Any] | None:
    """The error object of an OpenAI-shaped error body (``error_object``), None when the
    body is not one."""
    try:
        return error_object(response.json())
    except ValueError:
        return None


#: The codes of tokenspout's own 5xx and 429 errors. Their messages say what failed and
#: where, naming upstreams by address only, so behind another tokenspout its reason (which
#: of its upstreams failed, how) is passed on.
_RELAYED_CODES: frozenset[str] = frozenset(
    {"upstream_unavailable", "upstream_rate_limited", "upstream_failed", "upstream_timeout",
     "engine_unavailable", "server_overloaded", "shutting_down"}
)  # fmt: skip


def _with_message(why: str, server: UpstreamServer, response: httpx.Response) -> str:
    """``why``, and the message of the upstream's error body when it is another
    tokenspout's (``_RELAYED_CODES``). Any other server's message is logged, not passed on:
    it may tell its operator's account (OpenAI's 429 names the organization and its
    limits), which the clients of this server have no business reading."""
    error = _error(response)
    said = str(error.get("message") or "")[:500] if error is not None else ""
    if not said:
        return why
    if error is not None and error.get("code") in _RELAYED_CODES:
        return f"{why} ({said})"
    logger.warning("upstream %s: %s: %r", server.address, why, said)
    return why


def _refused(server: UpstreamServer, response: httpx.Response) -> UpstreamError:
    """The upstream's own 4xx, passed on with its status and OpenAI-shaped message."""
    status = response.status_code
    error = _error(response)
    if error is None:
        error = {"message": response.text[:500]}
    message = str(error.get("message") or f"status {status}")
    kind, code, param = error.get("type"), error.get("code"), error.get("param")
    # vLLM says its exception's class as the type and the status as the code
    # ("BadRequestError", 400): neither is one of OpenAI's, which clients compare with.
    if not isinstance(kind, str) or not kind.islower():
        kind = "invalid_request_error"
    return UpstreamError(
        f"upstream {server.address} refused the request: {message}",
        status_code=status,
        type=kind,
        code=code if isinstance(code, str) and code else "upstream_refused",
        param=str(param) if param is not None else None,
    )
