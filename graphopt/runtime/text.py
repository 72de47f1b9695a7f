"""A request's tokens as text: the final text of a finished request, and streamed pieces that add up to it.

Used by `CompiledModel.generate` / `stream` and by the HTTP server; both need the same rules, so a
streamed response and a non-streamed one for the same prompt are the same text.
"""

from __future__ import annotations

from .request import FinishReason, RequestOutput

__all__ = ["TextPieces", "output_text"]


def output_text(tokenizer, output: RequestOutput) -> str:
    """The text of a finished request: cut before a stop string, without its eos token."""
    if output.finish_reason is FinishReason.STOP:
        return output.text
    ids = output.token_ids[:-1] if output.finish_reason is FinishReason.EOS else output.token_ids
    return tokenizer.decode(ids)


class TextPieces:
    """One request's streamed tokens as text pieces that add up to its final text: the end of the
    text is held back while it is an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, new_ids: list[int], finished_output: RequestOutput | None = None) -> str:
        self.ids += new_ids
        if finished_output is not None:
            text = output_text(self.tokenizer, finished_output)
        else:
            text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if not text.startswith(self.shown):   # the tokenizer respelled earlier text: wait for more
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece
