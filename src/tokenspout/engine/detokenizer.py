"""Turn a stream of token ids into text deltas that are always safe to show.

Pure logic over a ``decode(ids) -> str`` callable. Two things are held back:

* an incomplete character: byte-level BPE tokens may end inside a multi-byte UTF-8
  sequence (emoji, CJK). Like vLLM and text-generation-inference we decode a short window
  of ids twice, from ``prefix_offset`` to ``read_offset`` (already shown) and to the end; the
  difference is new text, unless it ends in U+FFFD, in which case we wait for more tokens;
* a possible stop string: the longest tail of the text that is a prefix of some stop string
  waits until the next token shows whether the stop string completes.

When a stop string appears, the text is cut right before it and ``finish_reason`` is
``"stop"``. When generation ends inside a character, its bytes are dropped. Invariant: the
concatenation of every delta returned by ``add`` and ``flush`` is ``text``, the final
output text, which is ``decode(ids)`` less a cut character at the end and anything from
the stop string on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Incremental detokenizer for one request; see the module docstring."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] were decoded into text already; decoding from
        # prefix_offset (not read_offset) gives the tokenizer context for merged bytes.
        self._prefix_offset = 0
        self._read_offset = 0
        #: Decoded text so far (cut before the stop string once one is found).
        self.text = ""
        self._emitted = 0
        #: Set to ``"stop"`` once a stop string has been found; no text follows it.
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        """Feed one new token; return the text that is now safe to show (may be "")."""
        assert self.finish_reason is None, "token added after a stop string"
        self._ids.append(token_id)
        self.text += self._decode_new(final=False)
        return self._release()

    def flush(self) -> str:
        """The request ended for another reason: return everything still held back.

        Bytes at the very end that never completed a character are dropped.
        """
        if self.finish_reason is None:
            self.text += self._decode_new(final=True)
            self._find_stop()
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta

    def _decode_new(self, *, final: bool) -> str:
        shown = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if final:
            # Generation ended inside a character (e.g. at max_tokens): drop the cut bytes
            # rather than show U+FFFD.
            full = full.rstrip(REPLACEMENT_CHAR)
        elif full.endswith(REPLACEMENT_CHAR):
            return ""
        if len(full) <= len(shown):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(shown) :]

    def _release(self) -> str:
        if self._find_stop():
            end = len(self.text)
        else:
            end = len(self.text) - self._held_for_stop()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _find_stop(self) -> bool:
        """Cut ``text`` before the earliest stop string in the not-yet-shown part, if any."""
        # Text before _emitted cannot start a stop string: _held_for_stop kept any such tail.
        hits = [i for s in self._stop if (i := self.text.find(s, self._emitted)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        return True

    def _held_for_stop(self) -> int:
        """Length of the longest tail of the unshown text that starts some stop string."""
        tail = self.text[self._emitted :]
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(tail)), held, -1):
                if tail.endswith(s[:n]):
                    held = n
                    break
        return held
