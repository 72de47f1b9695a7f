"""Quality figures of a DeepSeek-V3 model with MTP: perplexity, MTP accuracy, greedy MTP acceptance.

Three measurements, each a plain function of (model, token ids):

  perplexity          exp(mean next-token NLL) over NON-overlapping windows of `window` tokens. Each
                      window is scored on its own: token i of a window is predicted from tokens 0..i-1
                      of the same window only, and the first token of every window is not scored (it
                      has no context). So the figure depends on `window`: shorter windows, less
                      context, higher perplexity. The last, shorter window is scored too.
  mtp_top1_accuracy   teacher-forced top-1 accuracy of the main head (token t+1) and of the MTP chain
                      (depth d predicts token t+1+d), exactly the quantities the training loss
                      (`graphopt.models.train_tiny`) optimises.
  mtp_acceptance      what greedy speculative decoding with the MTP module as drafter would accept.
                      Greedy speculative output is token-identical to greedy output, so we decode
                      greedily once (`greedy_generate`) and, at every decode position, compare the
                      k-draft MTP chain with the tokens greedy decoding really produced.

The draft chain at decode position t (token t+1 just produced by the main model), as a runtime with
one MTP KV cache runs it (see `_draft_chains`):

  draft 1 = argmax MTP(h_t, tok_{t+1})            at position t; context: MTP entries 0..t
  draft j = argmax MTP(g_{j-1}, draft_{j-1})      at position t+j-1; g_{j-1} is the MTP's own
                                                  pre-norm output of the previous draft

The cache entries at positions <= t are the ones computed from the main model's hidden states
(depth 1); the chain adds its own entries after them. A draft j is accepted when drafts 1..j all
equal the greedy tokens t+2..t+1+j.

Run `python -m graphopt.models.evaluate` for the figures of the packaged model (docs/embedded_model.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..ops.paged import slot_mapping
from .deepseek import DeepseekV3ForCausalLM
from .fileio import write_file_atomically
from .generate import greedy_generate

__all__ = [
    "heldout_prompts",
    "main",
    "mtp_acceptance",
    "mtp_top1_accuracy",
    "multi_token_logits",
    "perplexity",
]

HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout.txt"
SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:")


def multi_token_logits(model: DeepseekV3ForCausalLM, ids: torch.Tensor, depths: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of the main head and of MTP depths 1..depths, teacher-forced, aligned.

    ids: [B, T]. Main: logits [B, T-1, V] for ids[:, 1:]. Depth d reuses MTP module 0, chained on its
    own previous output: position t reads (h_{d-1}[t], ids[t+d]) and predicts ids[t+1+d], so its
    logits are [B, T-1-d, V] for ids[:, 1+d:] (h_0 is the main model's pre-norm hidden state).
    """
    if depths and ids.shape[1] < depths + 2:
        raise ValueError(f"{depths} MTP depth(s) need windows of at least {depths + 2} tokens, got {ids.shape[1]}")
    logits, hidden = model(ids, return_hidden=True)
    out = [(logits[:, :-1], ids[:, 1:])]
    for d in range(1, depths + 1):
        # hidden: [B, T-d+1, H] -> drop the last position, which has no token t+d to read
        logits_d, hidden = model.mtp_forward(0, ids[:, d:], hidden[:, :-1])
        out.append((logits_d[:, :-1], ids[:, 1 + d:]))
    return out


def _as_ids(token_ids) -> torch.Tensor:
    if isinstance(token_ids, np.ndarray):
        token_ids = token_ids.astype(np.int64)  # the corpus files are uint16
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be one flat sequence, got shape {tuple(ids.shape)}")
    return ids.long()


def _window_batches(token_ids, window: int, batch_size: int, min_len: int, device):
    """Non-overlapping windows of `window` tokens as [b, window] batches; the short tail alone."""
    ids = _as_ids(token_ids)
    full = ids.numel() // window
    windows = ids[: full * window].view(full, window)
    for start in range(0, full, batch_size):
        yield windows[start:start + batch_size].to(device)
    tail = ids[full * window:]
    if tail.numel() >= min_len:
        yield tail[None].to(device)


@torch.no_grad()
def _teacher_forced(model: DeepseekV3ForCausalLM, token_ids, window: int, batch_size: int, depths: int,
                    progress: bool = False) -> tuple[float, list[int], list[int]]:
    """One pass over the windows: (main NLL sum, hits per head, scored tokens per head)."""
    device = model.lm_head.weight.device
    nll, hits, counts = 0.0, [0] * (depths + 1), [0] * (depths + 1)
    n = _as_ids(token_ids).numel()
    n_windows = n // window + (n % window >= 2)                  # + the short tail, when it is scored
    # on stderr once the work has taken 2 s; gone when it ends
    with tqdm(total=n_windows, desc="score windows", unit="window", delay=2.0, leave=False,
              disable=not progress) as bar:
        for batch in _window_batches(token_ids, window, batch_size, 2, device):
            heads = multi_token_logits(model, batch, depths if batch.shape[1] >= depths + 2 else 0)
            nll += F.cross_entropy(heads[0][0].flatten(0, 1).float(), heads[0][1].flatten(), reduction="sum").item()
            for i, (logits, targets) in enumerate(heads):
                hits[i] += int((logits.argmax(-1) == targets).sum())
                counts[i] += targets.numel()
            bar.update(len(batch))
    if not counts[0]:
        raise ValueError("no window of at least 2 tokens to score")
    return nll, hits, counts


def perplexity(model: DeepseekV3ForCausalLM, token_ids, window: int = 512, batch_size: int = 8,
               progress: bool = False) -> float:
    """exp(mean NLL) of each non-overlapping window's tokens 1.. given that window's earlier tokens."""
    nll, _, counts = _teacher_forced(model, token_ids, window, batch_size, 0, progress)
    return math.exp(nll / counts[0])


def mtp_top1_accuracy(model: DeepseekV3ForCausalLM, token_ids, window: int = 512, batch_size: int = 8,
                      depths: int = 1, progress: bool = False) -> dict[str, float]:
    """Teacher-forced top-1 accuracy: {"main": token t+1, "mtp_1": token t+2, ..., "mtp_D": t+1+D}."""
    return _accuracies(*_teacher_forced(model, token_ids, window, batch_size, depths, progress)[1:])


def _accuracies(hits: list[int], counts: list[int]) -> dict[str, float]:
    names = ["main"] + [f"mtp_{d}" for d in range(1, len(hits))]
    return {name: h / c for name, h, c in zip(names, hits, counts) if c}


@torch.no_grad()
def _draft_chains(model: DeepseekV3ForCausalLM, seq: list[int], first: int, k_max: int,
                  block_size: int = 16) -> torch.Tensor:
    """Drafts [n, k_max] for decode positions t = first .. len(seq)-2-k_max (see module docstring)."""
    device = model.lm_head.weight.device
    ids = torch.tensor([seq], device=device)
    L = len(seq)
    positions = torch.arange(first, L - 1 - k_max, device=device)                 # [R] decode positions t
    R = positions.numel()
    n_blocks = -(-L // block_size)
    # depth 1 over the whole sequence: MTP entries for positions 0..L-2 land in blocks 1..n_blocks
    cache = model.new_kv_caches(n_blocks + 1, block_size, mtp=True)[0]          # block 0: padding sink
    table = torch.arange(1, n_blocks + 1, device=device)[None]
    _, hidden = model(ids, return_hidden=True)
    pos1 = torch.arange(L - 1, device=device)[None]
    logits, g = model.mtp_forward(0, ids[:, 1:], hidden[:, :-1], pos1, cache, slot_mapping(pos1, table, block_size),
                                  table)
    drafts = [logits[0, positions].argmax(-1)]                                    # [R]
    g = g[0, positions][:, None]                                                  # [R, 1, H]
    if k_max == 1:
        return drafts[0][:, None]
    # one private copy of the depth-1 cache per decode position: row r owns blocks 1 + r*n .. (r+1)*n
    caches = torch.cat([cache[:1], cache[1:].repeat(R, 1, 1)])                    # [1 + R*n, bs, D]
    tables = 1 + torch.arange(R, device=device)[:, None] * n_blocks + torch.arange(n_blocks, device=device)
    for j in range(2, k_max + 1):
        pos = (positions + j - 1)[:, None]                                        # [R, 1]
        slots = slot_mapping(pos, tables, block_size)
        logits, g = model.mtp_forward(0, drafts[-1][:, None], g, pos, caches, slots, tables)
        drafts.append(logits[:, 0].argmax(-1))
    return torch.stack(drafts, dim=1)                                             # [R, k_max]


@torch.no_grad()
def mtp_acceptance(model: DeepseekV3ForCausalLM, prompts: Sequence[Sequence[int]], k_max: int = 3,
                   new_tokens: int = 64, progress: bool = False) -> dict:
    """Greedy MTP speculative-decoding acceptance over the greedy continuations of `prompts`.

    Returns rates[j-1] = P(drafts 1..j all accepted), over every decode position of every prompt;
    and for each k <= k_max: mean_accepted = sum of the first k rates (expected accepted drafts per
    step) and tokens_per_step = 1 + mean_accepted; simulated_tokens_per_step walks the continuation
    as a speculative decoder would (accept n drafts, emit n + 1 tokens, jump) and divides.
    """
    if new_tokens < k_max + 1:
        raise ValueError(f"new_tokens ({new_tokens}) must exceed k_max ({k_max})")
    all_accepted = []
    walks = {k: [0, 0] for k in range(1, k_max + 1)}  # k -> [tokens, steps]
    for prompt in tqdm(prompts, desc="MTP acceptance", unit="prompt", delay=2.0, leave=False, disable=not progress):
        prompt = list(prompt)
        seq = prompt + greedy_generate(model, prompt, new_tokens)
        first = len(prompt) - 1
        drafts = _draft_chains(model, seq, first, k_max).cpu()                     # [R, k]
        rows = torch.arange(drafts.shape[0])[:, None] + first
        truth = torch.tensor(seq)[rows + 2 + torch.arange(k_max)]                  # tokens t+2 .. t+1+k
        accepted = (drafts == truth).long().cumprod(dim=1)                         # [R, k]: drafts 1..j ok
        all_accepted.append(accepted)
        for k, walk in walks.items():
            r = 0
            while r < accepted.shape[0]:
                n = int(accepted[r, :k].sum())
                walk[0] += n + 1
                walk[1] += 1
                r += n + 1
    accepted = torch.cat(all_accepted).double()
    rates = accepted.mean(dim=0).tolist()
    by_k = [{"k": k, "mean_accepted": sum(rates[:k]), "tokens_per_step": 1 + sum(rates[:k]),
             "simulated_tokens_per_step": walks[k][0] / walks[k][1]} for k in range(1, k_max + 1)]
    return {"positions": int(accepted.shape[0]), "rates": rates, "by_k": by_k}


def heldout_prompts(token_ids, n: int = 32, length: int = 64) -> list[list[int]]:
    """n snippets of `length` tokens at evenly spaced offsets of a token stream (deterministic)."""
    ids = _as_ids(token_ids)
    if ids.numel() < length:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one prompt ({length})")
    span = ids.numel() - length
    return [ids[i * span // n: i * span // n + length].tolist() for i in range(n)]


def _markdown(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| figure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.models.evaluate",
                                     description="Perplexity, MTP accuracy and greedy MTP acceptance of a model.")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the packaged tiny model)")
    parser.add_argument("--text", type=Path, default=HELDOUT_TEXT, help="held-out text to score")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-windows", type=int, help="score only the first N windows")
    parser.add_argument("--depths", type=int, default=2, help="MTP depths for the top-1 accuracy")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k-max", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48, help="tokens to complete each sample prompt (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from .checkpoint import load
    from .tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = load(args.model, dtype=torch.float32, device=args.device).eval()
    tokenizer = load_tokenizer(args.model / "tokenizer.json" if args.model else None)
    ids = torch.tensor(tokenizer.encode(args.text.read_text(encoding="utf-8")))
    scored = ids if args.max_windows is None else ids[: args.max_windows * args.window]
    t0 = time.perf_counter()
    nll, hits, counts = _teacher_forced(model, scored, args.window, 8, args.depths, progress=True)  # ppl + top-1
    ppl, acc = math.exp(nll / counts[0]), _accuracies(hits, counts)
    t1 = time.perf_counter()
    prompts = heldout_prompts(ids, args.prompts, args.prompt_len)
    spec = mtp_acceptance(model, prompts, args.k_max, args.new_tokens, progress=True)
    t2 = time.perf_counter()

    rows = [("held-out tokens scored", f"{scored.numel()} (windows of {args.window})"),
            ("held-out perplexity (main model)", f"{ppl:.3f}"),
            ("top-1 accuracy, main head (token t+1)", f"{acc['main']:.4f}")]
    rows += [(f"top-1 accuracy, MTP depth {d} (token t+{d + 1})", f"{acc[f'mtp_{d}']:.4f}")
             for d in range(1, args.depths + 1)]
    print(_markdown(rows) + f"\n\n({t1 - t0:.1f} s)\n")
    print(f"Greedy MTP acceptance: {len(prompts)} held-out prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} greedy tokens each, {spec['positions']} decode positions\n")
    print("| k drafts | P(drafts 1..k accepted) | mean accepted / step | tokens / step (expected) "
          "| tokens / step (simulated walk) |\n| --- | --- | --- | --- | --- |")
    for row in spec["by_k"]:
        print(f"| {row['k']} | {spec['rates'][row['k'] - 1]:.4f} | {row['mean_accepted']:.4f} "
              f"| {row['tokens_per_step']:.4f} | {row['simulated_tokens_per_step']:.4f} |")
    print(f"\n({t2 - t1:.1f} s)")
    samples = {}
    if args.samples:
        print("\nGreedy completions:")
        for text in SAMPLE_PROMPTS:
            out = greedy_generate(model, tokenizer.encode(text), args.samples, eos_token_id=tokenizer.eos_token_id)
            samples[text] = tokenizer.decode(out)
            print(f"\n--- {text!r}\n{text}{samples[text]}")
    if args.json:
        figures = {"perplexity": ppl, "window": args.window, "tokens": scored.numel(), "top1": acc,
                   "acceptance": spec, "samples": samples}
        write_file_atomically(args.json, (json.dumps(figures, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
