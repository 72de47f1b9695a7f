"""Tensor + expert parallel decoding of the embedded model over 2 ranks (gloo on CPU), rank 0 admitting.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py     # torchrun starts the ranks
    python examples/tensor_parallel.py --ranks 2                # or the example starts them itself
    python examples/tensor_parallel.py --save tp_out            # ... and each rank saves tp_out/rank<r>
    python examples/tensor_parallel.py --load tp_out            # each rank reloads its own: no capture, no passes

Every rank loads only its shard of the checkpoint and compiles it with tp = ep = ranks (each holds its
heads, MLP columns, vocab rows and experts); only rank 0 adds requests; `LockstepEngine` broadcasts them and every rank steps the same
batch. Rank 0 prints the tokens, the collectives per step and whether they equal the unsharded model's.
"""

import argparse
import os

import torch


def main(rank: int, world: int, new_tokens: int, save: str | None = None, load_dir: str | None = None) -> None:
    import graphopt
    from graphopt.models import load
    from graphopt.models.generate import greedy_generate
    from graphopt.passes.sharding import count_collectives
    from graphopt.runtime.distributed import LockstepEngine
    from graphopt.runtime.request import SamplingParams

    from graphopt.models.shard_load import load_shard

    # this rank reads only its slices of the checkpoint (None: the embedded one); the placeholders of the
    # other ranks' slices are never written, so their memory is never committed
    if load_dir:                                   # a sharded artefact: this rank's own directory
        compiled = graphopt.load_compiled(os.path.join(load_dir, f"rank{rank}"))
    else:
        rank_model, shards = load_shard(None, tp=world, ep=world, rank=rank, dtype=torch.float32)
        compiled = graphopt.compile(rank_model, spec="mtp", tp=world, ep=world, shards=shards, progress=False)
    if save:
        compiled.save(os.path.join(save, f"rank{rank}"))
    loop = LockstepEngine(compiled.engine(max_batch_size=4, num_blocks=64))
    prompts = [[1, 300, 400, 500], [1, 42, 43]]
    if rank == 0:
        for p in prompts:
            loop.add_request(p, SamplingParams(max_new_tokens=new_tokens, eos_token_id=None))
    tokens: dict[int, list[int]] = {}
    for events in loop.steps():
        for e in events:
            tokens.setdefault(e.request_id, []).extend(e.new_token_ids)
    if rank == 0:
        print(f"ranks: {world}, {compiled.report.notes['parallel']}")
        print(f"collectives per step: {count_collectives(compiled.graphs['step'])}")
        model = load(dtype=torch.float32)          # the whole model, only to compare against
        for i, p in enumerate(prompts):
            same = tokens[i] == greedy_generate(model, p, new_tokens)
            print(f"{p} -> {tokens[i]}  (same as unsharded: {same})")


def _torchrun_entry(new_tokens: int, save: str | None, load_dir: str | None) -> None:
    from graphopt.runtime.distributed import init_process_group
    import torch.distributed as dist
    init_process_group()
    try:
        main(dist.get_rank(), dist.get_world_size(), new_tokens, save, load_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks to start when not under torchrun")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--save", metavar="DIR", help="each rank saves its compiled shard to DIR/rank<r>")
    parser.add_argument("--load", metavar="DIR", help="each rank loads DIR/rank<r> instead of compiling")
    args = parser.parse_args()
    if "RANK" in os.environ:                       # started by torchrun
        _torchrun_entry(args.new_tokens, args.save, args.load)
    else:
        from graphopt.runtime.distributed import run_local
        run_local(main, args.ranks, args.new_tokens, args.save, args.load, timeout_s=600)
