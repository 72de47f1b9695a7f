"""The persistent decode batch on the device, and the few host <-> device copies a step makes.

One row per batch slot, allocated once: tokens [S, 1+k], start_pos [S], block_tables [S, W],
the sampling fields [S] and active [S] (S = max_batch_size, or the provider's batch bucket above it;
W = the widest block table a request can need). A decode step reads views of rows [0, n) and writes its outputs back into them on the device:

    tokens <- next_tokens,  start_pos <- next_start_pos,  active <- active & ~finished

so consecutive steps need nothing from the host. Host -> device traffic happens only when
membership changes (a request's sampling fields on admission; its first tokens come from the
prefill outputs, device to device) and when a prompt chunk takes cache blocks (one indexed write
of (slot, index, block) triples). Device -> host: out_tokens, num_emitted and finished, copied
non-blocking into pinned buffers on CUDA and read one step later.
"""

from __future__ import annotations

import torch

from ..step.contract import IDLE_SAMPLING, SAMPLING_FIELDS, SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from .request import Request

__all__ = ["DecodeBatch", "HostCopy", "Pending"]


class HostCopy:
    """Copies step outputs to the host without stalling the device queue.

    `start(**tensors)` enqueues the copies (pinned buffers, non_blocking, one event on CUDA) and
    returns a `Pending`; `Pending.wait()` blocks until they landed and returns python lists. Two
    buffer sets alternate, so the copies of step N+1 can be in flight while the host reads step N's.
    Calling the object (`copy(**tensors)`) is `start(...).wait()`.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pinned: list[dict[str, torch.Tensor]] = [{}, {}]
        self._turn = 0

    def __call__(self, **tensors: torch.Tensor) -> dict[str, list]:
        return self.start(**tensors).wait()

    def start(self, **tensors: torch.Tensor) -> "Pending":
        if not self.cuda:
            return Pending({k: t.tolist() for k, t in tensors.items()}, None)
        pinned, self._turn = self._pinned[self._turn], 1 - self._turn
        views = {}
        for k, t in tensors.items():
            buf = pinned.get(k)
            if buf is None or buf.numel() < t.numel():
                buf = pinned[k] = torch.empty(max(t.numel(), 64), dtype=t.dtype, pin_memory=True)
            views[k] = buf[:t.numel()].view(t.shape)
            views[k].copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Pending(views, done)


class Pending:
    """Step outputs on their way to the host (see HostCopy)."""

    def __init__(self, values: dict, done):
        self._values, self._done = values, done

    def wait(self) -> dict[str, list]:
        if self._done is not None:
            self._done.synchronize()       # the only wait of a step: that step's own outputs
            self._values, self._done = {k: v.tolist() for k, v in self._values.items()}, None
        return self._values


class DecodeBatch:
    def __init__(self, max_rows: int, num_speculative_tokens: int, table_width: int, device: torch.device):
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.device, self.max_rows, self.width = device, max_rows, table_width
        self.tokens = zeros(max_rows, 1 + num_speculative_tokens)
        self.start_pos = zeros(max_rows)
        self.block_tables = zeros(max_rows, table_width)
        self.params = {name: torch.full((max_rows,), IDLE_SAMPLING[name], dtype=dtype, device=device)
                       for name, dtype in SAMPLING_FIELDS}   # rows without a request: valid, idle values
        self.active = zeros(max_rows, dtype=torch.bool)
        self.copy_out = HostCopy(device)      # decode outputs (two buffer sets: one step in flight)
        self.copy_prefill = HostCopy(device)  # prefill outputs, read at once

    # -- membership (host -> device) ----------------------------------------------------------
    def admit(self, requests: list[Request]) -> None:
        """Write the admitted requests' sampling fields; their rows stay inactive until prefill ends."""
        if not requests:
            return
        slots = self._index([r.slot for r in requests])
        values = {"temperature": [r.params.temperature for r in requests],
                  "top_k": [r.params.top_k for r in requests],
                  "top_p": [r.params.top_p for r in requests],
                  "min_p": [r.params.min_p for r in requests],
                  "seed": [r.seed for r in requests],
                  "eos_token_id": [-1 if r.params.eos_token_id is None else r.params.eos_token_id
                                   for r in requests],
                  "max_pos": [r.max_pos for r in requests]}
        for name, dtype in SAMPLING_FIELDS:
            self.params[name].index_copy_(0, slots, torch.tensor(values[name], dtype=dtype).to(self.device))
        self.active.index_fill_(0, slots, False)
        self.block_tables.index_fill_(0, slots, 0)   # stale entries of the slot's previous owner

    def set_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """block_tables[slot, index] = block for each new (slot, index, block) triple."""
        if entries:
            slot, index, block = torch.tensor(entries, dtype=torch.int64).to(self.device).unbind(1)
            self.block_tables.index_put_((slot, index), block)

    def join(self, slots: list[int], out: SpecStepOutputs) -> None:
        """Prefill outputs (rows in `slots` order) become those rows' first decode inputs, on the device."""
        index = self._index(slots)
        self.tokens.index_copy_(0, index, out.next_tokens)
        self.start_pos.index_copy_(0, index, out.next_start_pos)
        self.active.index_copy_(0, index, ~out.finished)

    def deactivate(self, slots: list[int]) -> None:
        """Rows the host stopped (stop string, abort): the device could not know."""
        if slots:
            self.active.index_fill_(0, self._index(slots), False)

    # -- step inputs and outputs --------------------------------------------------------------
    def decode_inputs(self, n: int, width: int, kv_caches, mtp_caches, greedy: bool = False) -> SpecStepInputs:
        """Views of rows [0, n): the same tensors every step for the same n (a full-width table is a
        view too; a narrower one is copied to be contiguous). greedy: every decoding request has
        temperature 0 (the caller knows which rows hold requests; padding rows do not count)."""
        return SpecStepInputs(tokens=self.tokens[:n], start_pos=self.start_pos[:n],
                              block_tables=self.block_tables[:n, :width].contiguous(),
                              **{k: v[:n] for k, v in self.params.items()}, active=self.active[:n],
                              kv_caches=kv_caches, mtp_caches=mtp_caches, greedy=greedy)

    def absorb(self, n: int, out: SpecStepOutputs) -> None:
        """The device-side step preparation: this step's outputs become the next step's inputs."""
        self.tokens[:n].copy_(out.next_tokens)
        self.start_pos[:n].copy_(out.next_start_pos)
        self.active[:n] &= ~out.finished

    def prefill_inputs(self, slots: list[int], chunks: list[list[int]], starts: list[int], width: int,
                       is_last: bool, kv_caches, mtp_caches) -> SpecPrefillInputs:
        """Right-padded prompt chunks [B, T] (host data) plus the rows' fields gathered on the device."""
        T = max(len(c) for c in chunks)
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], dtype=torch.int64).to(self.device)
        lengths = torch.tensor([len(c) for c in chunks], dtype=torch.int64).to(self.device)
        start = torch.tensor(starts, dtype=torch.int64).to(self.device)
        index = self._index(slots)
        return SpecPrefillInputs(ids=ids, lengths=lengths, start_pos=start,
                                 block_tables=self.block_tables[:, :width].index_select(0, index),
                                 **{k: v.index_select(0, index) for k, v in self.params.items()},
                                 is_last_chunk=is_last, kv_caches=kv_caches, mtp_caches=mtp_caches)

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64).to(self.device)
