"""One speculative step as one module: main model verify -> acceptance -> MTP drafts, all on the device.

`SpecStep` implements the step contract of `graphopt/step/contract.py` in plain torch plus graphopt
ops, with no `.item()` and no host loop over rows, so torch.export turns it into ONE graph
(`passes/fuse_spec_step.py`; `step/provider.py` serves both). Run eagerly with the model's own
forward as `main_fn` / `mtp_fns` (`SpecStep.from_model`) it is the semantic reference the fused graph
is tested against.

Per row, with k drafts and s = start_pos (docs/speculative.md has a worked example):

    tokens [B, 1+k]     t0 (last emitted, its KV not cached yet), d1 .. dk (drafts)
    positions           s + [0 .. k];  slot(p): step/paged.slot_mapping, the sink 0 if inactive
    main model          logits [B, 1+k, V] (index j predicts position s+1+j), hidden [B, 1+k, H] pre-norm
    acceptance          greedy: keep d_i while d_i == argmax(logits[i-1]); sampling: keep d_i with
                        prob p(d_i) (greedy drafts: q one-hot), else resample from max(0, p - q);
                        then one correction / bonus token. a = accepted drafts, 1 + a tokens emitted
    stop                cut after eos or at max_pos -> num_emitted, finished
    MTP                 inputs shifted by one: next_ids[j] = token at s+1+j, i.e. tokens[:, 1:] with
                        the correction at index a; same positions, slots and block tables as the main
                        model. MTP output at index a (position s+a, hidden h_{s+a}, token at s+a+1)
                        predicts position s+a+2: draft 1 of the next step
    chained drafts      draft j+2 (j = 0 .. k-2): the MTP layer (the next one when the checkpoint has
                        several) on its own output hidden state, input token = draft j+1, at position
                        s + num_emitted + j
    next step           tokens = [last emitted, k drafts], start_pos = s + num_emitted

Why reusing the main model's positions is right (the FusionSpec argument). The MTP at position t
combines h_t with the embedding of token t+1; it ignores token 0 of the step, so its token input is
the step's tokens shifted left by one. It still runs at position t (not t+1): both its query and its
keys are rotated by their own positions, and RoPE makes q_t . k_u depend only on t - u, so any
common shift of all positions leaves every attention score unchanged. Using t for the MTP means the
main model's positions, slot mapping and block tables are reused as they are: one step preparation,
no second input build, and the MTP cache slot of position t holds the entry for (h_t, token t+1).

Cache entries written for rejected positions (and by chained drafts) are at positions >= the next
step's start_pos, so the next step overwrites them before anything reads them.

Prefill (`SpecPrefill`) runs the main model over a prompt chunk; on the last chunk it samples the
first token, runs the MTP over the chunk (hidden at p, token p+1; the last one is the new token) and
chains the drafts. Approximations that only affect draft quality, never the output: an earlier
chunk's last MTP entry uses the model's guess of the next token; with several MTP layers, layers
after the first are written only by chained drafts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.sampling import DEFAULT_MAX_TOP_K
from .contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from .model_step import MainStep, MTPStep
from .paged import slot_mapping

__all__ = ["DECODE_INPUTS", "PREFILL_INPUTS", "STEP_OUTPUTS", "SpecPrefill", "SpecStep", "as_outputs", "decode_args",
           "prefill_args"]


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]]: x [B, T, D], index [B] -> [B, D]."""
    return x.gather(1, index[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    # [B] -> [B * n], each row's value repeated for its n positions
    return t[:, None].expand(-1, n).reshape(-1)


def _stop(out, accepted, first_pos, eos, max_pos, active):
    """Cut the emitted tokens after eos / at max_pos. out [B, 1+k], out[:, j] sits at first_pos + j."""
    n = out.shape[1]
    idx = torch.arange(n, device=out.device)[None, :]
    produced = idx <= accepted[:, None]
    hit = ((out == eos[:, None]) & (eos[:, None] >= 0)) | (first_pos[:, None] + idx >= max_pos[:, None])
    stop = produced & hit
    first_stop = torch.where(stop, idx, torch.full_like(idx, n)).min(dim=1).values
    num = torch.minimum(accepted + 1, first_stop + 1)
    return torch.where(active, num, torch.zeros_like(num)), stop.any(dim=1) | ~active


class _Speculator(nn.Module):
    """What decode and prefill share: the main/MTP callables, acceptance and the draft chain."""

    def __init__(self, main_fn: nn.Module, mtp_fns: list[nn.Module], num_speculative_tokens: int,
                 block_size: int, sampling: bool = True, max_top_k: int = DEFAULT_MAX_TOP_K):
        super().__init__()
        k = num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {k!r}")
        if k > 0 and not mtp_fns:
            raise ValueError(f"num_speculative_tokens = {k} needs at least one MTP module (mtp_fns is "
                             "empty); load a checkpoint with MTP weights or use k = 0")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        # registered MTP first: a weight both graphs hold (embedding, head, all of a captured model)
        # is then named after the main graph in the fused graph's dumps
        self.mtp_fns = nn.ModuleList(mtp_fns if k > 0 else [])
        self.main_fn = main_fn
        self.k, self.block_size, self.sampling, self.max_top_k = k, block_size, sampling, max_top_k

    @classmethod
    def from_model(cls, model, num_speculative_tokens: int, block_size: int = 16, **kw):
        """Over the eager model's own forward (the semantic reference)."""
        mtp = [MTPStep(model, d) for d in range(model.config.num_nextn_predict_layers)]
        return cls(MainStep(model), mtp, num_speculative_tokens, block_size, **kw)

    def _main(self, ids, positions, slots, block_tables, kv_caches):
        """-> logits, hidden, the caches as written (functional graphs return them; the eager model
        writes in place and returns two values, so its caches are the written ones)."""
        out = self.main_fn(ids, positions, slots, block_tables, kv_caches)
        return (*out[:2], list(out[2]) if len(out) > 2 else kv_caches)

    def _mtp(self, depth, next_ids, hidden, positions, slots, block_tables, mtp_caches):
        """Runs MTP layer `depth`; replaces mtp_caches[depth] by the cache as written."""
        out = self.mtp_fns[depth](next_ids, hidden, positions, slots, block_tables, mtp_caches[depth])
        if len(out) > 2:
            mtp_caches[depth] = out[2]
        return out[0], out[1]

    @staticmethod
    def _write_back(inputs: list[torch.Tensor], written: list[torch.Tensor]) -> None:
        """One copy per cache at the very end: the graph stays functional until its last nodes."""
        for cache, new in zip(inputs, written):
            if new is not cache:
                cache.copy_(new)

    def _probs(self, logits, temperature, top_k, top_p, min_p):
        # logits [B, T, V] -> the per-row filtered target distribution [B, T, V]
        B, T, V = logits.shape
        flat = torch.ops.graphopt.sampling_probs(logits.reshape(-1, V), _rows(temperature, T), _rows(top_k, T),
                                                 _rows(top_p, T), _rows(min_p, T), self.max_top_k)
        return flat.view(B, T, V)

    def _chain(self, mtp_logits, mtp_hidden, at, next_start, block_tables, valid, mtp_caches):
        """Draft 1 from the MTP output at index `at` [B]; drafts 2..k by chaining -> [B, k] int64."""
        draft = _at(mtp_logits, at).argmax(dim=-1)                                 # [B]
        hidden = _at(mtp_hidden, at)[:, None]                                      # [B, 1, H]
        drafts = [draft]
        for j in range(self.k - 1):
            depth = min(j + 1, len(self.mtp_fns) - 1)
            pos = (next_start + j)[:, None]                                        # [B, 1]
            slots = slot_mapping(pos, block_tables, self.block_size, valid[:, None])
            pos = torch.where(valid[:, None], pos, torch.zeros_like(pos))
            logits, hidden = self._mtp(depth, draft[:, None], hidden, pos, slots, block_tables, mtp_caches)
            draft = logits[:, 0].argmax(dim=-1)
            drafts.append(draft)
        return torch.stack(drafts, dim=1)

    def _draft(self, ids, at, emitted, hidden, positions, slots, block_tables, next_start, valid, mtp_caches):
        """Run the MTP over the main model's window with inputs shifted by one, then chain."""
        shifted = ids.roll(-1, dims=1)                                             # [B, T]: token p+1 at p
        next_ids = shifted.scatter(1, at[:, None], emitted[:, None])              # the new token at `at`
        logits, mtp_hidden = self._mtp(0, next_ids, hidden, positions, slots, block_tables, mtp_caches)
        return self._chain(logits, mtp_hidden, at, next_start, block_tables, valid, mtp_caches)


class SpecStep(_Speculator):
    """One decode step of the contract: SpecStepInputs fields in, SpecStepOutputs fields out.

    main_fn(input_ids, positions, slot_mapping, block_tables, kv_caches) -> (logits, hidden) and
    mtp_fns[d](next_ids, hidden, positions, slot_mapping, block_tables, mtp_cache) -> (logits, hidden):
    the eager model (`from_model`, caches written in place) or captured graphs, which may also return
    the written caches as a third value instead of writing them (`passes.fuse_spec_step.FunctionalStep`);
    those are threaded through the step and copied into the cache inputs once, at the end.
    sampling=False builds the greedy-only step (temperature and the filters are ignored; use it when
    every row is greedy).
    """

    def forward(self, tokens, start_pos, block_tables, temperature, top_k, top_p, min_p, seed, eos_token_id,
                max_pos, active, kv_caches: list[torch.Tensor], mtp_caches: list[torch.Tensor]):
        B, k1 = tokens.shape
        offs = torch.arange(k1, device=tokens.device)[None, :]
        valid = active[:, None].expand(B, k1)
        positions = start_pos[:, None] + offs                                      # [B, 1+k]
        slots = slot_mapping(positions, block_tables, self.block_size, valid)
        positions = torch.where(valid, positions, torch.zeros_like(positions))
        logits, hidden, kv_written = self._main(tokens, positions, slots, block_tables, kv_caches)
        mtp_written = list(mtp_caches)
        drafts = tokens[:, 1:]
        if self.sampling:
            probs = self._probs(logits, temperature, top_k, top_p, min_p)
            out, accepted = torch.ops.graphopt.rejection_accept(probs, drafts, None, seed, start_pos)
        else:
            out, accepted = torch.ops.graphopt.greedy_accept(logits.argmax(dim=-1), drafts)
        num_emitted, finished = _stop(out, accepted, start_pos + 1, eos_token_id, max_pos, active)
        out_tokens = torch.where(offs < num_emitted[:, None], out, torch.full_like(out, -1))
        last = out.gather(1, (num_emitted - 1).clamp(min=0)[:, None]).squeeze(1)
        last = torch.where(active, last, tokens[:, 0])
        next_start = start_pos + num_emitted
        next_tokens = last[:, None]
        if self.k > 0:
            emitted = out.gather(1, accepted[:, None]).squeeze(1)                   # correction / bonus
            drafts = self._draft(tokens, accepted, emitted, hidden, positions, slots, block_tables, next_start,
                                 active, mtp_written)
            next_tokens = torch.cat([next_tokens, drafts], dim=1)
        self._write_back(kv_caches, kv_written)
        self._write_back(mtp_caches, mtp_written)
        return out_tokens, num_emitted, next_tokens, next_start, finished


class SpecPrefill(_Speculator):
    """A prompt chunk per row (SpecPrefillInputs fields; is_last_chunk as a 0-d bool tensor).

    Outputs as SpecStep's: on the last chunk out_tokens = [first token, -1 ...], num_emitted = 1,
    next_tokens = [first token, k drafts]; on earlier chunks nothing is emitted (num_emitted = 0,
    tokens -1, finished False). next_start_pos = start_pos + lengths either way.
    """

    def forward(self, ids, lengths, start_pos, block_tables, temperature, top_k, top_p, min_p, seed,
                eos_token_id, max_pos, is_last_chunk, kv_caches: list[torch.Tensor],
                mtp_caches: list[torch.Tensor]):
        B, T = ids.shape
        offs = torch.arange(T, device=ids.device)[None, :]
        valid = offs < lengths[:, None]                                            # [B, T] right padding
        positions = torch.where(valid, start_pos[:, None] + offs, torch.zeros_like(offs))
        slots = slot_mapping(positions, block_tables, self.block_size, valid)
        logits, hidden, kv_written = self._main(ids, positions, slots, block_tables, kv_caches)
        mtp_written = list(mtp_caches)
        at = (lengths - 1).clamp(min=0)
        end = start_pos + lengths                                                  # the first token's position
        last_logits = _at(logits, at)                                              # [B, V]
        if self.sampling:
            probs = self._probs(last_logits[:, None], temperature, top_k, top_p, min_p)[:, 0]
            first = torch.ops.graphopt.sample_from_probs(probs, seed, end)
        else:
            first = last_logits.argmax(dim=-1)
        emit = is_last_chunk.expand(B)
        num_emitted, finished = _stop(first[:, None], torch.zeros_like(lengths), end, eos_token_id, max_pos, emit)
        out = torch.full((B, 1 + self.k), -1, dtype=torch.int64, device=ids.device)
        out_tokens = torch.cat([torch.where(emit, first, out[:, 0])[:, None], out[:, 1:]], dim=1)
        next_tokens = first[:, None]
        if self.k > 0:
            drafts = self._draft(ids, at, first, hidden, positions, slots, block_tables, end, emit, mtp_written)
            next_tokens = torch.cat([next_tokens, drafts], dim=1)
        self._write_back(kv_caches, kv_written)
        self._write_back(mtp_caches, mtp_written)
        next_tokens = torch.where(emit[:, None], next_tokens, torch.full_like(next_tokens, -1))
        return out_tokens, num_emitted, next_tokens, end, finished & emit


# -- the contract's dataclasses <-> positional graph arguments ------------------------------------

# the names of the step / prefill graphs' arguments and outputs, in order (Program signatures)
DECODE_INPUTS = ("tokens", "start_pos", "block_tables", "temperature", "top_k", "top_p", "min_p", "seed",
                 "eos_token_id", "max_pos", "active", "kv_caches", "mtp_caches")
PREFILL_INPUTS = ("ids", "lengths", "start_pos", "block_tables", "temperature", "top_k", "top_p", "min_p", "seed",
                  "eos_token_id", "max_pos", "is_last_chunk", "kv_caches", "mtp_caches")
STEP_OUTPUTS = ("out_tokens", "num_emitted", "next_tokens", "next_start_pos", "finished")


def decode_args(inputs: SpecStepInputs) -> tuple:
    """SpecStep / fused step graph arguments, in order."""
    i = inputs
    return (i.tokens, i.start_pos, i.block_tables, i.temperature, i.top_k, i.top_p, i.min_p, i.seed,
            i.eos_token_id, i.max_pos, i.active, list(i.kv_caches), list(i.mtp_caches))


def prefill_args(inputs: SpecPrefillInputs) -> tuple:
    """SpecPrefill / fused prefill graph arguments, in order (is_last_chunk becomes a 0-d bool tensor)."""
    i = inputs
    last = torch.tensor(bool(i.is_last_chunk), device=i.ids.device)
    return (i.ids, i.lengths, i.start_pos, i.block_tables, i.temperature, i.top_k, i.top_p, i.min_p, i.seed,
            i.eos_token_id, i.max_pos, last, list(i.kv_caches), list(i.mtp_caches))


def as_outputs(result) -> SpecStepOutputs:
    """The (out_tokens, num_emitted, next_tokens, next_start_pos, finished) tuple as SpecStepOutputs."""
    return SpecStepOutputs(*result)
