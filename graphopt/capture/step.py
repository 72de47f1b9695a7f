"""torch.export capture of the step functions: the main model and each MTP module over the paged cache.

One capture serves prefill and decode: the batch (B), token (T), block-table (M) and cache-block
(N) dimensions are dynamic, so a prompt chunk of 512 tokens and a decode step of 1+k tokens run
the same graph. Two captures exist because the MTP module has different inputs (the main model's
hidden states) and runs after the main model's acceptance, which a later pass fuses into one graph.

Graph signature of the main step (what every pass sees as placeholders, in order):
    input_ids    [B, T]  int64      positions  [B, T]  int64
    slot_mapping [B, T]  int64      block_tables [B, M] int64
    kv_caches_0 .. kv_caches_{L-1}  [N, block_size, kv_lora_rank + rope_dim], mutated in place
  outputs: logits [B, T, vocab], hidden [B, T, hidden] (pre-norm, the MTP's input).
MTP step d: next_ids [B, T], hidden [B, T, hidden], positions, slot_mapping, block_tables, mtp_cache
  -> logits, mtp_hidden.

The captured graph is the functional ATen graph of `ExportedProgram.run_decompositions({})`,
unlifted (`.module()`): weights are get_attr nodes, cache writes are functional `index_copy`
results copied back into the cache inputs by trailing `copy_` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.export import Dim

from ..models.deepseek import DeepseekV3ForCausalLM
from ..step.model_step import MainStep, MTPStep
from ..step.paged import slot_mapping


class CaptureError(RuntimeError):
    """torch.export could not capture the step; the message names the module and the operation."""


@dataclass
class CapturedGraph:
    """A captured step: the graph module plus what a pass or verifier needs to run it."""

    name: str
    graph_module: torch.fx.GraphModule
    make_inputs: Callable[[int], tuple]   # seed -> fresh valid inputs (fresh caches: they are mutated)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


class StepInputFactory:
    """Valid random step inputs: ragged positions, a shuffled block table, padding in the sink slot."""

    def __init__(self, model: DeepseekV3ForCausalLM, block_size: int, batch: int = 2, tokens: int = 3):
        self.config = model.config
        self.dtype = model.lm_head.weight.dtype
        self.device = model.lm_head.weight.device
        self.block_size, self.batch, self.tokens = block_size, batch, tokens

    def common(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        B, T, bs = self.batch, self.tokens, self.block_size
        start = torch.randint(0, 3 * bs, (B,), generator=g)                     # cached tokens before
        positions = start[:, None] + torch.arange(T)                            # [B, T]
        max_blocks = int(positions.max()) // bs + 1
        num_blocks = 1 + B * max_blocks
        blocks = (torch.randperm(num_blocks - 1, generator=g) + 1).view(B, max_blocks)  # never block 0
        slots = slot_mapping(positions, blocks, bs)
        ids = torch.randint(0, self.config.vocab_size, (B, T), generator=g)
        caches = lambda n: [(torch.randn(num_blocks, bs, self.config.kv_cache_dim, generator=g) * 0.5)
                            .to(self.dtype) for _ in range(n)]
        dev = lambda t: t.to(self.device)
        return g, dev(ids), dev(positions), dev(slots), dev(blocks), caches

    # random values are drawn on the host from a CPU generator (the same draws on every device), then
    # moved to the model's device once; explicit, so a default device set elsewhere cannot leak in
    def main(self, seed: int) -> tuple:
        with torch.device("cpu"):
            _, ids, pos, slots, blocks, caches = self.common(seed)
            return ids, pos, slots, blocks, [c.to(self.device) for c in caches(self.config.num_hidden_layers)]

    def mtp(self, seed: int) -> tuple:
        with torch.device("cpu"):
            g, ids, pos, slots, blocks, caches = self.common(seed)
            hidden = torch.randn(*ids.shape, self.config.hidden_size, generator=g).to(self.dtype).to(self.device)
            return ids, hidden, pos, slots, blocks, caches(1)[0].to(self.device)


def _dynamic_shapes(num_layers: int, mtp: bool):
    B, T, M, N = Dim("batch", min=1, max=4096), Dim("tokens", min=1, max=65536), Dim("blocks_per_seq", max=65536), \
        Dim("num_blocks", max=1 << 24)
    bt, btm, cache = {0: B, 1: T}, {0: B, 1: M}, {0: N}
    if mtp:
        return (bt, {0: B, 1: T}, bt, bt, btm, cache)
    return (bt, bt, bt, btm, [cache] * num_layers)


def _export(module: nn.Module, args: tuple, dynamic_shapes, what: str) -> torch.fx.GraphModule:
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions({})
    except Exception as e:  # export errors are long; keep the first lines and name the step
        first = "\n".join(str(e).strip().splitlines()[:12])
        raise CaptureError(f"torch.export failed while capturing {what}: {type(e).__name__}: {first}") from e
    gm = ep.module()
    # export re-checks the dtype of every .to() at run time; meta["val"] already records those
    # dtypes, and the checks would sit between the ops every pattern has to match
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def capture_main(model: DeepseekV3ForCausalLM, block_size: int = 16) -> CapturedGraph:
    inputs = StepInputFactory(model, block_size)
    gm = _export(MainStep(model), inputs.main(0), _dynamic_shapes(model.config.num_hidden_layers, False),
                 f"the main model step ({type(model).__name__}, {model.config.num_hidden_layers} layers)")
    names = ["input_ids", "positions", "slot_mapping", "block_tables"] + \
        [f"kv_caches_{i}" for i in range(model.config.num_hidden_layers)]
    return CapturedGraph("main", gm, inputs.main, names, ["logits", "hidden"])


def capture_mtp(model: DeepseekV3ForCausalLM, depth: int, block_size: int = 16) -> CapturedGraph:
    inputs = StepInputFactory(model, block_size)
    gm = _export(MTPStep(model, depth), inputs.mtp(0), _dynamic_shapes(1, True), f"MTP module {depth}")
    names = ["next_ids", "hidden", "positions", "slot_mapping", "block_tables", "mtp_cache"]
    return CapturedGraph(f"mtp{depth}", gm, inputs.mtp, names, ["logits", "hidden"])
