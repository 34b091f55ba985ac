"""Token ids in, text deltas out, the way a streaming client must see them; stop strings.

The one detokenizer of the project: the engine uses it to finish a request at a stop string,
the serving front end to stream text deltas.

The concatenated deltas equal the non-streamed text exactly: an incomplete UTF-8 character is
held back until it completes (or the request ends), and so is any tail that may still grow into
a stop string; a stop string ends the text just before it (it is not part of the completion).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._num_sent = 0  # characters of the decoded text already handed out
        self.text = ""  # everything handed out so far
        self.stopped = False  # a stop string was found; nothing more will be handed out

    def add(self, token_ids: Iterable[int], final: bool = False) -> str:
        """The new text these ids complete; `final` flushes whatever is held back."""
        if self.stopped:
            return ""
        self._ids += token_ids
        full = self._tokenizer.decode_output(self._ids)
        end = self._stop_at(full)
        if end is not None:
            self.stopped = True
        elif final:
            end = len(full)
        elif full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        else:
            end = len(full) - self._possible_stop_prefix(full)
        delta = full[self._num_sent : end] if end > self._num_sent else ""
        self._num_sent = max(self._num_sent, end)
        self.text += delta
        return delta

    def _stop_at(self, full: str) -> int | None:
        """Index of the earliest stop string in the text not yet handed out (or overlapping it)."""
        longest = max((len(s) for s in self._stop), default=0)
        start = max(0, self._num_sent - longest + 1)
        hits = [i for s in self._stop if (i := full.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _possible_stop_prefix(self, full: str) -> int:
        """Length of the longest tail of `full` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best
