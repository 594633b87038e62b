"""Target tokens -> text, exactly once: whole UTF-8 characters only, stop
strings honoured across round boundaries, `max_tokens` counted in tokens.

The same emitter serves streamed and non-streamed answers, so both give the
same text. Text that might be the start of a stop string is held back until
it is known not to be."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable


class Emitter:
    def __init__(self, piece: Callable[[int], bytes], eos: frozenset[int], stop: tuple[str, ...],
                 max_tokens: int) -> None:
        self.piece = piece
        self.eos = eos
        self.stop = tuple(s for s in stop if s)
        self.max_tokens = max_tokens
        # tokens generated, the end-of-generation token included, as llama.cpp's
        # servers count them (what `usage.completion_tokens` reports)
        self.n = 0
        self.finish: str | None = None
        self.tokens: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet released

    def feed(self, tokens: Iterable[int]) -> str:
        """Take target tokens in order; returns the text that may be released now.
        After the answer ends, `finish` is "stop" or "length" and later tokens are ignored."""
        out: list[str] = []
        for tok in tokens:
            if self.finish is not None:
                break
            self.n += 1
            if tok in self.eos:
                self.finish = "stop"
                break
            self.tokens.append(tok)
            self._pending += self._decoder.decode(self.piece(tok))
            if self.stop:
                cut = self._find_stop()
                if cut is not None:
                    out.append(self._pending[:cut])
                    # what follows the stop string is dropped, including bytes of a
                    # character its last token began: no U+FFFD for them
                    self._pending = ""
                    self._decoder.reset()
                    self.finish = "stop"
                    break
            if self.n >= self.max_tokens:
                self.finish = "length"
        if self.finish is not None:
            out.append(self._pending + self._decoder.decode(b"", final=True))
            self._pending = ""
        else:
            keep = self._held()
            safe = len(self._pending) - keep
            out.append(self._pending[:safe])
            self._pending = self._pending[safe:]
        return "".join(out)

    def _find_stop(self) -> int | None:
        best = None
        for s in self.stop:
            i = self._pending.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _held(self) -> int:
        return stop_holdback(self._pending, self.stop)


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still become a stop
    string: that much must be held back until the next text decides."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held
