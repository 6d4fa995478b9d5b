"""What a generation request carries into an engine and what comes back out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from tokenspout.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenspout.engine.tool_calls import Tool

#: ``content_filter`` (OpenAI's): an upstream withheld the rest of the answer.
FinishReason = Literal["stop", "length", "cancelled", "tool_calls", "content_filter"]

#: Most entries a request's ``logit_bias`` may have (OpenAI's limit).
MAX_LOGIT_BIAS = 300
#: Most alternatives per token that ``top_logprobs`` may ask for (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: A seed is a signed 64-bit integer (OpenAI's type, vLLM's range): a larger one overflows
#: the generator's seed, and an upstream refuses it.
MIN_SEED = -(2**63)
MAX_SEED = 2**63 - 1
#: A temperature below this is greedy (vLLM's ``_SAMPLING_EPS``).
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant made: ``arguments`` is a JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat; ``role`` is system, user, assistant or tool. An assistant
    message may carry the ``tool_calls`` it made; a tool message answers ``tool_call_id``.
    ``name`` is the participant's, as the client gave it: chat templates do not render it,
    but an upstream is sent it. ``content`` is the message's text (its text parts, a line
    apart). ``sent`` is the message as the client sent it (content parts of any type, fields
    tokenspout does not read), for an engine that passes messages on to another server
    (upstream) rather than rendering them; None for one built here."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    sent: Mapping[str, Any] | None = None

    def continued(self, text: str) -> ChatMessage:
        """This message with ``text`` appended to its content, in its sent form too (a cut
        answer's continuation): the last text part goes on, as vLLM joins text parts into
        one string; a content that ends with another part gets a text part of its own."""
        sent = self.sent
        if sent is not None:
            sent = {**sent, "content": _appended(sent.get("content"), text)}
        return replace(self, content=self.content + text, sent=sent)


def _appended(content: Any, text: str) -> Any:
    if isinstance(content, str):
        return content + text
    if not content:
        return text
    *before, last = content
    if last.get("type") == "text":
        return [*before, {**last, "text": last["text"] + text}]
    return [*content, {"type": "text", "text": text}]


@dataclass(frozen=True)
class Grammar:
    """A constraint on the output: ``kind`` is ``json_schema`` (``source`` is the schema as
    JSON text), ``json_object`` (any JSON object), ``regex``, ``choice`` (``source`` is a JSON
    list of strings) or ``lark`` (a llguidance Lark grammar, used for tool calls)."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "lark"]
    source: str = ""
    #: The request field it came from, named by errors (empty: ``response_format``).
    param: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 (below ``SAMPLING_EPS``) means greedy;
    ``top_k <= 0`` disables top-k."""

    max_tokens: int = 16
    #: False when the client left ``max_tokens`` out and the server filled it in: an engine
    #: that cannot count the prompt's tokens (upstream) then leaves it out too, so that the
    #: server there fills in the context's room, and stops at ``max_tokens`` itself.
    max_tokens_given: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    #: Keep only tokens at least ``min_p`` times as likely as the most likely one (0: off).
    min_p: float = 0.0
    #: OpenAI's penalties, subtracted from a logit: ``presence`` once for a token that is in
    #: the output so far, ``frequency`` times its count there.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: vLLM's multiplicative penalty on tokens of the prompt and output (1: off).
    repetition_penalty: float = 1.0
    #: Added to the logits of these token ids before anything else.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Return the sampled token's log-probability, with this many alternatives (None: no).
    logprobs: int | None = None
    grammar: Grammar | None = None
    #: Output in the generic tool-call format is parsed into ``ToolCallDelta`` extras.
    tool_calls: bool = False
    #: ``tool_choice`` named the function: the answer that calls it finishes with "stop",
    #: as OpenAI's and vLLM's do ("tool_calls" is for a call the model chose to make).
    named_tool: bool = False
    #: The output begins with the prompt's text (completions' ``echo``); with ``logprobs``,
    #: the prompt's tokens come with theirs (``OutputExtras.prompt_logprobs``). With echo,
    #: ``max_tokens`` may be 0: the prompt alone, scored.
    echo: bool = False
    #: The model the request names (an engine in front of several servers routes by it).
    model: str | None = None
    #: The client's other fields as it sent them (sampling fields, vendor extensions,
    #: tools), for an engine that passes them on to another server; empty otherwise.
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.echo else 1):
            raise InvalidRequestError(
                "max_tokens must be at least 1 (0 only with echo)", param="max_tokens"
            )
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise InvalidRequestError(
                f"seed must be between {MIN_SEED} and {MAX_SEED}", param="seed"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p must be in [0, 1]", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be between -2 and 2", param=name)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(
                "repetition_penalty must be in (0, 2]", param="repetition_penalty"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias has more than {MAX_LOGIT_BIAS} entries", param="logit_bias"
            )
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise InvalidRequestError(
                "logit_bias values must be between -100 and 100", param="logit_bias"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs"
            )

    @property
    def penalized(self) -> bool:
        """Whether any penalty needs the tokens generated so far."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def prompt_logprobs(self) -> bool:
        """Whether every prompt position's logits are needed (echo with logprobs)."""
        return self.echo and self.logprobs is not None

    @property
    def greedy(self) -> bool:
        # Below vLLM's epsilon, as in vLLM: dividing by a temperature that small overflows
        # float32 (1e-300 is 0 there), and its distribution is the argmax's anyway.
        return self.temperature < SAMPLING_EPS


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for an engine, built by ``Engine.encode_completion/encode_chat``.

    One shape for every engine, which reads whichever part it needs:

    * ``text``: the completion prompt, or the rendered chat (template applied) for engines
      that render one; the synthetic engine keeps the words it echoes here;
    * ``token_ids``: what a local model consumes; None when the engine does not tokenize
      (an upstream server tokenizes itself, so tokenspout never needs its tokenizer);
    * ``messages``/``tools``: a chat prompt as the client gave it (empty for a completion),
      with how its template is to end: a generation prompt for a new assistant turn, or the
      final message left open (``continue_final_message``, vLLM's semantics);
    * ``traceparent``: the W3C Trace Context of the request's span when the server traces
      requests (``00-<trace id>-<span id>-<flags>``), else None; an engine that asks
      another server passes it on, so that the work there joins the request's trace.
    """

    text: str
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] = ()
    tools: tuple[Tool, ...] = ()
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    traceparent: str | None = None

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def field(self) -> str:
        """The request field it came from, which errors about it name."""
        return "messages" if self.is_chat else "prompt"

    @property
    def num_tokens(self) -> int:
        """Prompt tokens as far as tokenspout knows them (0 when the upstream tokenizes)."""
        return 0 if self.token_ids is None else len(self.token_ids)


class EngineOutput(NamedTuple):
    """One step's worth of output for one request (a named tuple: one is built per token,
    and a tuple is the cheapest immutable record to build).

    ``text`` is the new text since the previous output; it may be empty when the
    detokenizer holds back an incomplete UTF-8 character or a possible stop string.
    ``num_tokens`` is the number of new tokens this output accounts for. The last output of
    a request has ``finish_reason`` set; counts are cumulative for the request.
    """

    text: str
    num_tokens: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    #: What else this output carries (logprobs, tool-call pieces); None for plain text.
    extras: OutputExtras | None = None
    #: The embedded engine's id of the token this output accounts for: kept with the text
    #: so that another replica continues from the ids, which re-tokenizing the text need
    #: not give back. None from the other engines.
    token_id: int | None = None


class TokenLogprob(NamedTuple):
    """One generated token's log-probability and the most likely alternatives
    (``top``: (token, bytes, logprob) sorted by logprob, most likely first). A prompt's
    first token has none (``logprob`` None): nothing comes before it."""

    token: str
    bytes: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...]


class ToolCallDelta(NamedTuple):
    """A piece of the ``index``-th tool call: its first piece has ``id`` and ``name``, the
    later ones add to ``arguments`` (concatenated, they are the arguments' JSON text)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class OutputExtras(NamedTuple):
    """Per-token extras of an ``EngineOutput``: the token's logprob (when asked for), the
    tool-call pieces its text completed (the text then goes there instead of ``text``), and
    an upstream's chat text that is not the answer's content (reasoning, a refusal)."""

    logprob: TokenLogprob | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    #: With echo and logprobs, on the first output: every prompt token's logprob.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    #: A piece of a reasoning model's reasoning (an upstream's ``reasoning_content``).
    reasoning: str = ""
    #: A piece of the model's refusal to answer (OpenAI's ``refusal``).
    refusal: str = ""


def check_chat_ending(
    messages: tuple[ChatMessage, ...] | list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> None:
    """How a chat prompt ends must make sense (vLLM's rules): the final message is either
    answered (a generation prompt) or continued, never both, and only an assistant
    message is continued."""
    if not continue_final_message:
        return
    if add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    if not messages or messages[-1].role != "assistant":
        raise InvalidRequestError(
            "continue_final_message needs the final message to be an assistant message",
            param="continue_final_message",
        )
