"""Requests as the host sees them: sampling parameters, lifecycle state, streamed events, results."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FinishReason", "Request", "RequestEvent", "RequestOutput", "SamplingParams", "config_eos"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; validated on construction.

    temperature 0 is greedy. top_k 0, top_p 1 and min_p 0 switch those filters off. seed None: the
    engine uses the request id, so runs are reproducible but two identical requests differ.
    eos_token_id None: stop only on max_new_tokens or a stop string. The eos token itself is part
    of the output (as in `graphopt.models.generate.greedy_generate`); a stop string is not (the
    output ends before it, see `graphopt.runtime.stop`).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 16
    eos_token_id: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a bare string would be split into characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("temperature", self.temperature >= 0, "a float >= 0 (0 = greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "a float in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "a float in [0, 1] (0 = off)"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**63),
             "None or a 64-bit int"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an int >= 1"),
            ("eos_token_id", self.eos_token_id is None or (isinstance(self.eos_token_id, int)
                                                           and self.eos_token_id >= 0), "None or a token id >= 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r} is invalid; expected {accepted}")


class FinishReason(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"          # max_new_tokens reached
    STOP = "stop"              # a stop string appeared (output truncated before it)
    ABORTED = "aborted"


class Status(enum.Enum):
    WAITING = "waiting"        # queued: no slot or not enough cache yet
    PREFILL = "prefill"        # has a slot and blocks; prompt chunks still running
    DECODE = "decode"          # first token emitted; in the decode batch
    FINISHED = "finished"


@dataclass
class RequestEvent:
    """What one engine step produced for one request (streamed)."""

    request_id: int
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason | None
    text: str | None = None    # decoded output when the engine has a tokenizer (exact stop-string cut)


@dataclass(eq=False)
class Request:
    """Host-side state of one request. `pos` mirrors the device's start_pos for this row."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    needed_positions: int                   # cache positions reserved for its whole life
    callback: Callable[[RequestEvent], None] | None = None
    status: Status = Status.WAITING
    slot: int = -1
    prefilled: int = 0                      # prompt tokens already in the cache
    pos: int = 0                            # device start_pos: position of the last emitted token
    generated: list[int] = field(default_factory=list)   # every token the device emitted
    released: int = 0                       # tokens already streamed (stop strings hold some back)
    finish_reason: FinishReason | None = None
    text: str | None = None

    @property
    def max_pos(self) -> int:
        """Position of the last token it may emit: prompt_len + max_new_tokens - 1."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, list(self.prompt), self.generated[:self.released],
                             self.finish_reason, self.text)


def config_eos(config) -> int | None:
    """The eos id generation stops on by default: the model config's `eos_token_id` (the first, when
    the config lists several: one id stops on the device), or None."""
    eos = getattr(config, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) and eos else eos if isinstance(eos, int) else None
