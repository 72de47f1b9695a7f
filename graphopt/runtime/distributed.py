"""The runtime on several ranks: process-group set-up with a timeout, a local launcher, and the engine
loop in lockstep (rank 0 admits requests and broadcasts them; every rank steps the same batch).

    torchrun --nproc-per-node 2 examples/tensor_parallel.py      # RANK, WORLD_SIZE, MASTER_* from torchrun
    init_process_group()                                         # gloo on CPU, nccl on CUDA; timeout set
    compiled = graphopt.compile(model, tp=2, ep=2)               # every rank, same arguments
    loop = LockstepEngine(compiled.engine())
    if loop.rank == 0: loop.add_request(prompt, params)          # only rank 0 takes requests
    for events in loop.steps(): ...                              # every rank, until rank 0 says stop

Why lockstep is enough: a sharded step is one graph per rank whose collectives pair up across ranks,
so every rank must launch the same steps on the same batch. The engine is deterministic given its
requests (scheduling, block allocation and sampling seeds depend only on them and on the step's
outputs, which the collectives make equal on every rank), so broadcasting the requests a step admits
(and the aborts) keeps every rank's engine identical; nothing else crosses ranks on the host.

A rank that dies makes the others' next collective fail: gloo reports a closed connection at once,
a rank that hangs is caught by the process group's timeout. Either way `RankLostError` names this
rank, what it was doing and the timeout, and the caller exits instead of waiting forever.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .engine import Engine
from .request import RequestEvent, SamplingParams

__all__ = ["DEFAULT_TIMEOUT_S", "LockstepEngine", "RankLostError", "free_port", "init_process_group", "run_local"]

DEFAULT_TIMEOUT_S = 60.0   # a collective waiting longer than this for a peer fails instead of hanging


class RankLostError(RuntimeError):
    """Another rank of the process group died or stopped answering."""


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    with a timeout: gloo on CPU, nccl when CUDA is there, unless `backend` says otherwise."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_process_group: {missing} not set; launch with torchrun "
                           f"(torchrun --nproc-per-node N script.py) or use graphopt.runtime.distributed.run_local")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def run_local(fn: Callable, world_size: int, *args, timeout_s: float = 300.0,
              collective_timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "gloo") -> None:
    """fn(rank, world_size, *args) in `world_size` new processes, each in one gloo process group on a free
    local port (what torchrun does, for tests and self-launching examples). An exception in a rank is
    raised here with its traceback; past `timeout_s` every rank is killed and TimeoutError raised."""
    import torch.multiprocessing as mp
    port = free_port()
    ctx = mp.start_processes(_rank_main, args=(fn, world_size, port, backend, collective_timeout_s, args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"run_local: {world_size} ranks still running after {timeout_s:.0f} s; killed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT of a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, backend: str, timeout_s: float, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


class LockstepEngine:
    """An Engine on every rank of `group`, stepped together. Rank 0 takes requests (`add_request`,
    `abort`, `stop`); each `step()` first broadcasts what rank 0 queued since the last one, every rank
    applies it to its engine in the same order (so request ids agree), then every rank steps."""

    def __init__(self, engine: Engine, group=None):
        if not dist.is_initialized():
            raise RuntimeError("LockstepEngine needs torch.distributed initialised (init_process_group)")
        self.engine, self.group = engine, group
        self.rank = dist.get_rank(group)
        self._queued: list[tuple] = []
        self._next_id = engine._next_id
        self.stopped = False

    # -- rank 0 -------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request for the next step (rank 0 only); returns the id every rank will give it."""
        self._rank0("add_request")
        self._queued.append(("add", list(prompt_ids), params or SamplingParams()))
        self._next_id += 1
        return self._next_id - 1

    def abort(self, request_id: int) -> None:
        self._rank0("abort")
        self._queued.append(("abort", request_id))

    def stop(self) -> None:
        """Every rank's `steps()` ends after the next broadcast."""
        self._rank0("stop")
        self._queued.append(("stop",))

    def _rank0(self, what: str) -> None:
        if self.rank != 0:
            raise RuntimeError(f"LockstepEngine.{what} on rank {self.rank}: only rank 0 admits requests")

    # -- every rank ---------------------------------------------------------------------------
    def step(self) -> list[RequestEvent]:
        """One broadcast of rank 0's queue, then one engine step on every rank."""
        commands = [self._queued if self.rank == 0 else None]
        self._guard("receiving rank 0's requests",
                    lambda: dist.broadcast_object_list(commands, src=0, group=self.group))
        self._queued = []
        for command in commands[0]:
            if command[0] == "add":
                self.engine.add_request(command[1], command[2])
            elif command[0] == "abort":
                self.engine.abort(command[1])
            else:
                self.stopped = True
        if self.stopped or not self.engine.has_unfinished():
            return []
        return self._guard("a sharded step", self.engine.step)

    def steps(self) -> Iterator[list[RequestEvent]]:
        """step() until rank 0 calls stop(), or, when rank 0 queued nothing more, until every request is done."""
        while not self.stopped:
            events = self.step()
            yield events
            if not self.stopped and not self.engine.has_unfinished() and self.rank == 0 and not self._queued:
                self.stop()

    def _guard(self, what: str, fn: Callable):
        try:
            return fn()
        except RankLostError:
            raise
        except RuntimeError as e:   # gloo: "Connection closed by peer", "Timed out waiting ..."; nccl: a timeout
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RankLostError(f"rank {self.rank}: another rank stopped answering during {what} ({text}); "
                                f"exiting instead of waiting (the process group's timeout bounds the wait)") from e
