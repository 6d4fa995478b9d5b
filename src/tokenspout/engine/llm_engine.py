"""The embedded CPU engine: a real model behind the async ``Engine`` interface.

Threads. One daemon *engine thread* loads and owns the model runner, the scheduler and the
per-request sampling state, and loops: take new requests and aborts from the inbox →
``step()`` (schedule → forward → sample → detokenize → deliver) → repeat, sleeping on a
condition when there is nothing to do. The event loop only talks to it through the inbox
(under ``_cond``) and receives outputs via ``loop.call_soon_threadsafe``, one callback per
step and loop.

Limits. A prompt of ``max_model_len`` tokens or more is refused (``PromptTooLongError``).
``max_tokens`` is clamped so that prompt + output fits ``max_model_len``; a request that
reaches the clamp finishes with ``"length"``, as when it reaches its own ``max_tokens``.

Seeds. A request with a ``seed`` draws from its own generator, so its tokens do not depend
on the other requests' draws. They are bit-exact only for the same computation, though: a
prompt whose prefix came from the prefix cache, or a different batch, rounds the logits
slightly differently, which can flip a sampled token near a probability boundary.

Constraints and extras. A request with a ``grammar`` gets an llguidance matcher (built on
this thread) whose token mask the sampler applies to its row; it finishes with ``"stop"`` as
soon as the grammar is complete. Requests that asked for logprobs or tool calls get them as
``EngineOutput.extras`` with each token.

Echo. A request with ``echo`` gets the prompt's text at the start of its first output. With
logprobs too, its prompt is computed whole (no prefix reuse) with every position's logits,
and the first output carries each prompt token's logprob: the model's own distribution
(no temperature or penalties), as vLLM's ``prompt_logprobs``. With ``max_tokens`` 0 the
token sampled after the prompt is dropped: the answer is the prompt alone, scored.

Failures. If a step raises, every running request fails with ``EngineError`` (their KV may
be half-written), waiting requests stay queued and the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from tokenspout.engine import tool_calls
from tokenspout.engine.continuation import Continuation, remaining_params
from tokenspout.engine.detokenizer import Detokenizer
from tokenspout.engine.interface import Engine, EngineStats, OutputSink
from tokenspout.engine.llama_model import LlamaConfig
from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.model_runner import ModelRunner, SeqChunk
from tokenspout.engine.request import (
    ChatMessage,
    EngineOutput,
    OutputExtras,
    Prompt,
    SamplingParams,
    TokenLogprob,
    check_chat_ending,
)
from tokenspout.engine.sampler import (
    RowContext,
    RowLogprobs,
    Sampled,
    Sampler,
    Uniforms,
)
from tokenspout.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from tokenspout.engine.sequence import Sequence
from tokenspout.engine.tokenizer import Tokenizer
from tokenspout.errors import (
    EngineError,
    EngineUnavailableError,
    GrammarFailedError,
    InvalidRequestError,
    PromptTooLongError,
)

if TYPE_CHECKING:
    # Imported where used: it imports llguidance, which only a grammar or logprobs request
    # needs (see _token_masks).
    from tokenspout.engine.grammar import TokenMasks

logger = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(eq=False)
class _Request:
    """One request in flight.

    ``seq``, ``detokenizer`` and ``uniforms`` belong to the engine thread; ``sink``,
    ``done`` and ``completion_tokens`` to the event loop ``loop``.
    """

    seq: Sequence
    detokenizer: Detokenizer
    uniforms: Uniforms
    loop: asyncio.AbstractEventLoop
    sink: OutputSink
    #: The sink has had its last item; later outputs are dropped.
    done: bool = False
    completion_tokens: int = 0
    #: Engine thread: the grammar's matcher (``llguidance.LLMatcher``) and the tool-call
    #: parser, when the request has them.
    matcher: Any = None
    tool_parser: tool_calls.ToolCallParser | None = None
    #: With echo: the prompt's text, which the first output begins with, and (with
    #: logprobs) its tokens' logprobs, gathered while the prompt is computed.
    echo: str | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


#: What the event loop posts to the engine thread: a new request, or the id to abort.
_InboxItem = _Request | str


class LLMEngine(Engine):
    """Continuous-batching CPU engine over ``ModelRunner``; see the module docstring."""

    def __init__(
        self,
        model: str | None = None,
        *,
        # 32 from the measured curve (RESULTS.md, issue 14): on an AVX-512 CPU goodput with TTFT
        # <= 500 ms went 4.1 / 4.9 / 5.3 req/s at 16 / 32 / 64 streams, each stream at 34 / 20 /
        # 11 tok/s; on an AVX2-only one it was about flat from 16 to 32.
        max_num_seqs: int = 32,
        max_model_len: int = 2048,
        max_prefill_tokens: int = 256,
        weights: str | None = None,
        prefix_cache: bool = True,
        num_threads: int | None = None,
    ):
        if max_num_seqs < 1 or max_prefill_tokens < 1 or max_model_len < 2:
            raise ValueError("max_num_seqs and max_prefill_tokens must be >= 1, max_model_len >= 2")
        self._model = model
        self._weights = weights
        self._num_threads = num_threads
        # Resolving is cheap (no weights read) and gives the id before start(), or fails fast;
        # so does the metadata (cached after the first read), for a context the model cannot
        # hold or a file whose header is damaged: refused before a server starts.
        files = ModelFiles.resolve(model)
        self.model_id = files.model_id
        LlamaConfig.from_dict(files.metadata()["config"]).check_context(max_model_len)
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(
            max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens,
            num_slots=max_num_seqs,
            prefix_cache=prefix_cache,
        )
        self.sampler = Sampler()
        self.runner: ModelRunner | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._inbox: deque[_InboxItem] = deque()
        self._stopping = False
        self._requests: dict[str, _Request] = {}  # event-loop side
        self._active: dict[str, _Request] = {}  # engine-thread side
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        #: Token id -> (text, bytes) for logprobs; engine thread.
        self._token_text = lru_cache(maxsize=1 << 16)(self._decode_token)

    # --- lifecycle (event loop) ---

    async def start(self) -> None:
        """Start the engine thread, which loads the model; return once it is ready.

        Raises what loading raised (``ModelLoadError``...). The model is loaded in the thread
        that will run every step, not in a worker thread: libgomp gives each thread that
        starts parallel work its own OpenMP pool, and with more pool threads than cores it
        stops spin-waiting, which made every decode step slower (batch 1: ~9 -> ~16 ms).
        """
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(loop, ready), name="tokenspout-engine", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None
            raise
        assert self.runner is not None
        self.model_id = self.runner.model_id

    async def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight fail with ``EngineError``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # --- Engine API (event loop) ---

    def encode_completion(self, prompt: str) -> Prompt:
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return self._prompt(self._runner().tokenizer.encode(prompt), prompt, "prompt")

    def encode_chat(
        self,
        messages: Seq[ChatMessage],
        tools: Seq[tool_calls.Tool] = (),
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> Prompt:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        for m in messages:
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"unknown role {m.role!r}", param="messages")
        check_chat_ending(messages, add_generation_prompt, continue_final_message)
        ending = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
        }
        tokenizer = self._runner().tokenizer
        if isinstance(tokenizer, Tokenizer) and tokenizer.renders_tools:
            text = tokenizer.render_chat(messages, tools=tools, **ending)
        else:
            text = tokenizer.render_chat(tool_calls.with_generic_tools(messages, tools), **ending)
        return replace(
            self._prompt(tokenizer.encode(text, add_special_tokens=False), text, "messages"),
            messages=tuple(messages),
            tools=tuple(tools),
            **ending,
        )

    def continuation(
        self, prompt: Prompt, params: SamplingParams, sofar: Continuation
    ) -> tuple[Prompt, SamplingParams]:
        """The prompt's ids followed by the answer's own ids (re-tokenized from its text
        when they are not known, or when they say more than the text: the detokenizer was
        holding some back), so greedy decoding resumes exactly where it was cut.
        Penalties on the output alone (presence, frequency) then see the first part as
        prompt: such a continuation is close, not exact. Nothing is left
        (``NothingLeftError``) at ``max_tokens`` or where the context is full: the uncut
        answer ended there with ``"length"``."""
        # The clamp the uncut request had (see ``_new_request``): its answer stopped there.
        room = self.max_model_len - len(prompt.token_ids or ())
        rest = remaining_params(replace(params, max_tokens=min(params.max_tokens, room)), sofar)
        refusal = self.continuation_refusal(params)
        if refusal is not None:
            raise refusal
        text = prompt.text + sofar.text
        tokenizer = self._runner().tokenizer
        if (
            prompt.token_ids is not None
            and sofar.token_ids is not None
            and tokenizer.decode(sofar.token_ids, skip_special_tokens=False) == sofar.text
        ):
            ids = prompt.token_ids + sofar.token_ids
        else:
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        self._check_prompt(ids, prompt.field)
        return replace(prompt, text=text, token_ids=ids), rest

    def continuation_refusal(self, params: SamplingParams) -> InvalidRequestError | None:
        if params.grammar is not None:
            # The grammar's matcher would have to replay the first part; not done.
            return InvalidRequestError(
                "a constrained answer (response_format, tools) cannot be continued",
                param="response_format",
            )
        if params.echo:
            # Not done here (the upstream engine continues one, asking for the rest without
            # the echo the client already has).
            return InvalidRequestError("an echoed answer cannot be continued", param="echo")
        return None

    def detokenize(self, token_ids: Seq[int]) -> str:
        self._check_ids(token_ids)
        return self._runner().tokenizer.decode(token_ids, skip_special_tokens=False)

    def token_strs(self, token_ids: Seq[int]) -> list[str]:
        self._check_ids(token_ids)
        return self._runner().tokenizer.pieces(token_ids)

    def _check_ids(self, token_ids: Seq[int]) -> None:
        vocab = self._runner().vocab_size
        for i, token in enumerate(token_ids):
            if not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"tokens[{i}] is {token}, not in the vocabulary (0 to {vocab - 1})",
                    param="tokens",
                )

    def check_params(self, params: SamplingParams) -> None:
        """Everything ``SamplingParams`` can ask for is served here; a grammar must be one
        llguidance supports, and the model's tokenizer must be one it can mask."""
        vocab = self._runner().vocab_size
        token_ids = {
            "logit_bias": [t for t, _ in params.logit_bias],
            "stop_token_ids": params.stop_token_ids,
        }
        for name, ids in token_ids.items():
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"{name} token ids must be in the vocabulary", param=name)
        if params.grammar is None:
            return
        param = "tools" if params.tool_calls else params.grammar.param or "response_format"
        if not self._can_mask():
            raise InvalidRequestError(
                "this model's tokenizer does not support constrained decoding", param=param
            )
        if params.ignore_eos:
            raise InvalidRequestError(
                "ignore_eos cannot be combined with a constrained output", param="ignore_eos"
            )
        from tokenspout.engine.grammar import check_grammar  # imported here: see TYPE_CHECKING

        check_grammar(params.grammar, param)

    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, sink: OutputSink
    ) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids = prompt.token_ids or ()
        self._check_prompt(ids, prompt.field)
        if len(ids) >= self.max_model_len and params.max_tokens > 0:
            # A whole context is only ever scored (echo, max_tokens 0): nothing fits after it.
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens: the model's context of "
                f"{self.max_model_len} tokens has no room for an answer",
                param=prompt.field,
            )
        self.check_params(params)
        if self.failure is not None:
            raise EngineUnavailableError(f"the engine has stopped: {self.failure}")
        if self._thread is None or self._stopping:
            raise EngineError("the engine is not running")
        req = self._new_request(request_id, prompt, params, sink)
        self._requests[request_id] = req
        self._post(req)

    def abort(self, request_id: str) -> bool:
        """Cancel a request; call it on the event loop thread."""
        req = self._requests.get(request_id)
        if req is None or req.done:
            return False
        req.done = True
        del self._requests[request_id]
        # Free the slot (or the queue place) at the next step.
        self._post(request_id)
        n_prompt = req.seq.num_prompt_tokens
        req.sink(EngineOutput("", 0, n_prompt, req.completion_tokens, "cancelled"))
        return True

    def stats(self) -> EngineStats:
        cache = self.scheduler.prefix_cache
        # Waiting: the live requests beyond the slots, counted here on the event loop. The
        # scheduler's queue would miss those still in the inbox, and a burst is admitted
        # (against --max-queued) before the engine thread takes any of it.
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=max(0, len(self._requests) - self.scheduler.max_num_seqs),
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            prefix_cache_queries_total=cache.queries,
            prefix_cache_hits_total=cache.hits,
        )

    # --- engine thread ---

    def step(self) -> None:
        """One engine iteration: schedule, run the model, sample, deliver."""
        plan = self.scheduler.schedule()
        sampled = self._run(plan)
        self.scheduler.postprocess(plan, sampled.tokens)
        self._prompt_tokens_total += plan.num_prefill_tokens
        self._generation_tokens_total += len(sampled.tokens)
        outputs: list[tuple[_Request, EngineOutput | EngineError]] = []
        try:
            rows = (seq for _, seq in plan.sampling)
            for seq, logprobs in zip(rows, sampled.logprobs, strict=True):
                outputs.append(self._postprocess(seq, logprobs))
        finally:
            # Delivered even when a later sequence failed: outputs taken out of the
            # scheduler here (finished sequences) have no other way to reach their streams.
            self._deliver(outputs)

    def _run(self, plan: SchedulerOutput) -> Sampled:
        runner = self._runner()
        for copy in plan.copies:
            runner.copy_slot_prefix(copy.src, copy.dst, copy.num_tokens, start=copy.start)
        chunks = [SeqChunk(c.seq.slot, c.token_ids, c.start_pos, c.is_prefill) for c in plan.chunks]
        # Prompts whose logprobs are asked for: every position's logits.
        full = [
            i for i, c in enumerate(plan.chunks) if c.is_prefill and c.seq.params.prompt_logprobs
        ]
        if full:
            logits, every = runner.forward_all(chunks, full)
            for i, chunk_logits in zip(full, every, strict=True):
                self._score_prompt(plan.chunks[i], chunk_logits)
        elif chunks:
            logits = runner.forward(chunks)  # [len(chunks), vocab]
        else:  # a step of twins of kept logits: nothing to run
            logits = torch.stack(plan.first_logits)  # type: ignore[arg-type]
        for i in plan.ending:
            prompt = plan.chunks[i].seq.prompt_token_ids
            self.scheduler.remember_first_logits(prompt, logits[i].clone())
        for twin in plan.twins:
            if (c := twin.copy) is not None:
                runner.copy_slot_prefix(c.src, c.dst, c.num_tokens, start=c.start)
        rows = [i for i, _ in plan.sampling]
        reqs = [self._active[seq.seq_id] for _, seq in plan.sampling]
        contexts = None
        if any(r.matcher is not None or r.seq.params.penalized or r.seq.params.logit_bias
               for r in reqs):  # fmt: skip
            contexts = [
                RowContext(r.seq.prompt_token_ids, r.seq.output_token_ids, r.matcher) for r in reqs
            ]
        if rows != list(range(logits.shape[0])):  # an index copy costs ~50 µs: only if needed
            logits = logits[rows]
        return self.sampler(
            logits, [r.seq.params for r in reqs], [r.uniforms for r in reqs], contexts
        )

    def _score_prompt(self, chunk: ScheduledChunk, logits: torch.Tensor) -> None:
        """The logprobs of the prompt tokens this chunk's positions predict (position p
        predicts token p + 1; the prompt's last position predicts the output)."""
        seq = chunk.seq
        start = chunk.start_pos
        n = min(len(chunk.token_ids), seq.num_prompt_tokens - 1 - start)
        if n <= 0:
            return
        targets = torch.tensor(seq.prompt_token_ids[start + 1 : start + 1 + n])  # [n]
        logprobs = torch.log_softmax(logits[:n], dim=-1)  # [n, V]
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        k = seq.params.logprobs or 0
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        out = self._active[seq.seq_id].prompt_logprobs
        for j, token in enumerate(targets.tolist()):
            top: tuple[tuple[str, bytes, float], ...] = ()
            if top_values is not None and top_ids is not None:
                pairs = zip(top_ids[j].tolist(), top_values[j].tolist(), strict=True)
                top = tuple((*self._token_text(t), v) for t, v in pairs)
            out.append(TokenLogprob(*self._token_text(token), chosen[j], top))

    def _postprocess(
        self, seq: Sequence, logprobs: RowLogprobs | None
    ) -> tuple[_Request, EngineOutput | EngineError]:
        """Detokenize a sequence's new token and finish it if it is done. A failure here
        ends this sequence only."""
        req = self._active[seq.seq_id]
        try:
            output = self._detokenize(req, seq, logprobs)
        except Exception as exc:
            if isinstance(exc, GrammarFailedError):  # the request's grammar, not a bug
                logger.warning("request %s: %s", seq.seq_id, exc.message)
                failure: EngineError = exc
            else:
                logger.exception("request %s: detokenizing failed", seq.seq_id)
                failure = EngineError(f"the engine failed on this request: {exc}")
            self.scheduler.fail(seq)
            del self._active[seq.seq_id]
            return req, failure
        if output.finish_reason is not None:
            self.scheduler.finish(seq)
            del self._active[seq.seq_id]
        return req, output

    def _detokenize(
        self, req: _Request, seq: Sequence, logprobs: RowLogprobs | None
    ) -> EngineOutput:
        if seq.max_tokens == 0:
            # Echo alone (the prompt, scored): the token sampled after it is not output.
            text, extras = self._echo(req, "", None)
            return EngineOutput(text, 0, seq.num_prompt_tokens, 0, "length", extras)
        token = seq.output_token_ids[-1]
        stop_ids = seq.params.stop_token_ids
        extras: OutputExtras | None = None
        if token in stop_ids or (
            not seq.params.ignore_eos and token in self._runner().tokenizer.eos_token_ids
        ):
            if token not in stop_ids and req.matcher is not None and req.matcher.is_error():
                # The grammar allowed nothing more (it matches no text at all): llguidance
                # leaves only the end token then, and that answer would not match it.
                raise _grammar_failed(req.matcher)
            # A stop token's own text (and logprob) is not part of the output.
            reason, text = "stop", req.detokenizer.flush()
        else:
            text = req.detokenizer.add(token)
            reason = req.detokenizer.finish_reason
            if reason is None and req.matcher is not None:
                req.matcher.consume_token(token)
                if req.matcher.is_error():
                    # An answer that stopped here would not match its grammar; the request
                    # ends with an error (_postprocess), not with a "stop".
                    raise _grammar_failed(req.matcher)
                if req.matcher.is_stopped():
                    # The grammar is complete: only its end could follow.
                    reason, text = "stop", text + req.detokenizer.flush()
            if reason is None and len(seq.output_token_ids) >= seq.max_tokens:
                reason, text = "length", text + req.detokenizer.flush()
            if logprobs is not None:
                extras = OutputExtras(logprob=self._token_logprob(token, logprobs))
        if req.tool_parser is not None:
            text, extras = self._parse_tools(req.tool_parser, text, extras, reason)
            if reason == "stop" and req.tool_parser.complete and not seq.params.named_tool:
                reason = "tool_calls"
        n = len(seq.output_token_ids)
        if req.echo is not None and n == 1:
            text, extras = self._echo(req, text, extras)
        return EngineOutput(text, 1, seq.num_prompt_tokens, n, reason, extras, token)

    @staticmethod
    def _echo(
        req: _Request, text: str, extras: OutputExtras | None
    ) -> tuple[str, OutputExtras | None]:
        """The first output's text and extras with the prompt (and its logprobs) first."""
        assert req.echo is not None
        if req.prompt_logprobs:
            extras = (extras or OutputExtras())._replace(prompt_logprobs=tuple(req.prompt_logprobs))
        return req.echo + text, extras

    @staticmethod
    def _parse_tools(
        parser: tool_calls.ToolCallParser,
        text: str,
        extras: OutputExtras | None,
        reason: str | None,
    ) -> tuple[str, OutputExtras | None]:
        """Move the text that belongs to a tool call into the output's extras."""
        content, calls = parser.feed(text)
        if reason is not None:
            rest, more = parser.finish(cut=reason == "length")
            content, calls = content + rest, calls + more
        if calls:
            extras = (extras or OutputExtras())._replace(tool_calls=calls)
        return content, extras

    def _token_logprob(self, token: int, logprobs: RowLogprobs) -> TokenLogprob:
        top = tuple((*self._token_text(t), lp) for t, lp in logprobs.top)
        return TokenLogprob(*self._token_text(token), logprobs.logprob, top)

    def _main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        """The engine thread: load the model, report to ``start()``, then serve."""
        try:
            self.runner = ModelRunner(
                self._model,
                num_slots=self.scheduler.prefix_cache.num_free,
                max_model_len=self.max_model_len,
                weights=self._weights,
                num_threads=self._num_threads,
            )
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ready, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        self._loop()

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            # Outside a step (the inbox, the scheduler's own state): the loop cannot go on.
            logger.exception("engine loop failed; it serves no more requests")
            self.failure = f"{type(exc).__name__}: {exc}"
        try:
            self._fail_all()
        except Exception:
            logger.exception("engine: failing the remaining requests failed")

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self.scheduler.has_work or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, deque()
            self._apply(inbox)
            if self.scheduler.has_work:
                try:
                    self.step()
                except Exception as exc:
                    logger.exception("engine step failed")
                    self._fail(list(self.scheduler.running.values()), exc)

    def _fail_all(self) -> None:
        """At shutdown: fail every request, whether running, waiting or still in the inbox."""
        with self._cond:
            inbox, self._inbox = self._inbox, deque()
        self._apply(inbox)
        self._fail(list(self.scheduler.running.values()), None)
        for seq in list(self.scheduler.waiting):
            self.scheduler.abort(seq.seq_id)
            self._deliver([(self._active.pop(seq.seq_id), EngineError("the engine shut down"))])

    def _apply(self, inbox: Iterable[_InboxItem]) -> None:
        for item in inbox:
            if isinstance(item, str):
                if self._active.pop(item, None) is not None:
                    self.scheduler.abort(item)
            else:
                if not self._start_request(item):
                    continue
                self._active[item.seq.seq_id] = item
                self.scheduler.add(item.seq)

    def _start_request(self, req: _Request) -> bool:
        """Build the request's grammar matcher here, off the event loop (a large schema can
        take a while); a grammar that fails to compile fails the request."""
        params = req.seq.params
        if params.prompt_logprobs:
            # The first prompt token has no logprob: nothing comes before it.
            first = req.seq.prompt_token_ids[0]
            req.prompt_logprobs.append(TokenLogprob(*self._token_text(first), None, ()))
        if params.tool_calls:
            req.tool_parser = tool_calls.ToolCallParser()
        if params.grammar is None:
            return True
        try:
            masks = self._token_masks()
            assert masks is not None, "check_params refuses grammars without masks"
            req.matcher = masks.matcher(params.grammar)
        except Exception as exc:
            self._deliver([(req, EngineError(f"the grammar could not be built: {exc}"))])
            return False
        return True

    def _fail(self, seqs: list[Sequence], exc: Exception | None) -> None:
        """Fail running sequences with ``EngineError`` and forget their (maybe bad) KV."""
        message = f"the engine failed: {exc}" if exc else "the engine shut down"
        failed = []
        for seq in seqs:
            self.scheduler.fail(seq)
            failed.append((self._active.pop(seq.seq_id), EngineError(message)))
        self._deliver(failed)

    # --- helpers ---

    def _deliver(self, items: list[tuple[_Request, EngineOutput | EngineError]]) -> None:
        """Hand outputs to their event loops, one thread-safe callback per loop."""
        by_loop: defaultdict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for req, item in items:
            by_loop[req.loop].append((req, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._receive, batch)
            except RuntimeError:
                logger.warning("dropping %d outputs for a closed event loop", len(batch))

    def _post(self, item: _InboxItem) -> None:
        with self._cond:
            self._inbox.append(item)
            self._cond.notify()

    def _receive(self, batch: list[tuple[_Request, EngineOutput | EngineError]]) -> None:
        """On the event loop: hand each output to its sink unless the request is over."""
        for req, item in batch:
            if req.done:
                continue
            if isinstance(item, EngineError):
                req.done = True
            else:
                req.completion_tokens = item.completion_tokens
                req.done = item.finish_reason is not None
            if req.done:
                self._requests.pop(req.seq.seq_id, None)
            req.sink(item)

    def _new_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, sink: OutputSink
    ) -> _Request:
        tokenizer = self._runner().tokenizer
        ids = prompt.token_ids or ()
        n_prompt = len(ids)
        seq = Sequence(
            request_id,
            ids,
            params,
            max_tokens=min(params.max_tokens, self.max_model_len - n_prompt),
        )
        return _Request(
            seq,
            Detokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), params.stop),
            Uniforms(params.seed),
            asyncio.get_running_loop(),
            sink,
            echo=prompt.text if params.echo else None,
        )

    def _can_mask(self) -> bool:
        """Whether llguidance can read this model's tokenizer."""
        return isinstance(self._runner().tokenizer, Tokenizer)

    def _token_masks(self) -> TokenMasks | None:
        """llguidance's tables for this tokenizer (None where it has none), built on first
        use: ~40 MB that a server never asked for a grammar or logprobs does without (server
        RSS after start 437 -> 399 MB, issue 14), and llguidance itself is imported only
        then (-> 392-394 MB). The build holds the GIL for ~0.4 s, so the whole process
        pauses that long, once."""
        if self.sampler.masks is None and self._can_mask():
            from tokenspout.engine.grammar import TokenMasks

            runner = self._runner()
            tokenizer = runner.tokenizer
            assert isinstance(tokenizer, Tokenizer)
            self.sampler.masks = TokenMasks(
                tokenizer.backend_json(), runner.vocab_size, tokenizer.eos_token_ids
            )
        return self.sampler.masks

    def _decode_token(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes, for logprobs (a token may hold part of a character)."""
        masks = self._token_masks()
        if masks is not None:
            raw = masks.token_bytes(token)
        else:
            raw = self._runner().tokenizer.decode([token]).encode()
        return raw.decode("utf-8", errors="replace"), raw

    def _prompt(self, token_ids: Seq[int], text: str, param: str) -> Prompt:
        # One longer than the context is encoded all the same (``/tokenize`` answers its
        # count, as vLLM's does); a generation is refused for it by the server's limits and
        # again at ``submit``.
        if not token_ids:
            raise InvalidRequestError("the prompt has no tokens", param=param)
        return Prompt(text, tuple(token_ids))

    def _check_prompt(self, token_ids: Seq[int], param: str) -> None:
        """``param``: the request field the prompt came from (``Prompt.field``)."""
        if not token_ids:
            raise InvalidRequestError("the prompt has no tokens", param=param)
        if len(token_ids) > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens",
                param=param,
            )
        vocab = self._runner().vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError("prompt token ids must be in the vocabulary", param=param)

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise EngineError("the engine is not started")
        return self.runner


def _grammar_failed(matcher: Any) -> GrammarFailedError:
    """The error of a request whose ``llguidance.LLMatcher`` is in its error state."""
    # Its first line: the rest dumps the matcher's state and grammar.
    error = matcher.get_error().splitlines()[0]
    return GrammarFailedError(f"the grammar failed: {error}")


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    """Resolve ``start()``'s future unless it was cancelled meanwhile."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
