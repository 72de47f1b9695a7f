"""Stop strings, checked on the host on the decoded text of the emitted tokens.

Rule: the output ends *before* the earliest stop string. Text and tokens do not align (a token can
hold the end of the text and the start of the stop string), so:
  * `RequestOutput.text` is the decoded text cut exactly where the stop string starts;
  * `RequestOutput.token_ids` is the longest prefix of the emitted tokens whose decoded text is a
    prefix of that cut text, so a token straddling the start of the stop string is dropped with it.
Streaming never shows what the final result removes: while the end of the text could still be the
beginning of a stop string (or is an incomplete UTF-8 character), those tokens are held back.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["StopStrings"]

_INCOMPLETE = "\ufffd"  # what byte-level decoding yields for a partial UTF-8 sequence


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StopStrings:
    """Finds stop strings in a request's emitted tokens and says how many tokens are safe to stream."""

    def __init__(self, tokenizer: _Decoder, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops

    def check(self, tokens: list[int], released: int, final: bool) -> tuple[int, str | None]:
        """(tokens that may be streamed, the cut text when a stop string was found, else None).

        `released` tokens were already streamed (never taken back); `final`: no more tokens come
        (eos / max_new_tokens), so nothing needs holding back.
        """
        text = self.tokenizer.decode(tokens)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            cut_text = text[:min(cuts)]
            return self._tokens_within(tokens, released, cut_text), cut_text
        if final:
            return len(tokens), None
        return self._tokens_within(tokens, released, text[:len(text) - self._held_chars(text)]), None

    def _held_chars(self, text: str) -> int:
        """Length of the longest end of `text` that could still grow into a stop string."""
        held = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        incomplete = len(text) - len(text.rstrip(_INCOMPLETE))
        return max(held, incomplete)

    def _tokens_within(self, tokens: list[int], released: int, prefix: str) -> int:
        for t in range(len(tokens), released, -1):
            if prefix.startswith(self.tokenizer.decode(tokens[:t])):
                return t
        return released
