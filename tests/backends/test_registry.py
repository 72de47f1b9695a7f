"""The backend registry and the eager backend's Executable (step contract + plain forward)."""

import pytest
import torch

import graphopt
from graphopt import backends
from graphopt.backends.base import Backend, Executable
from graphopt.config import BACKENDS, resolve_backend
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.step.contract import StepProvider


def test_config_lists_the_registered_backends():
    assert BACKENDS == ("auto", *backends.names()) and "eager" in backends.names()
    assert resolve_backend("auto") == "eager" and resolve_backend("eager") == "eager"
    with pytest.raises(ValueError, match="unknown backend 'nope'; accepted: auto, eager"):
        resolve_backend("nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'; registered: eager"):
        backends.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        backends.register("eager", Backend)


def test_get_builds_a_backend_once():
    eager = backends.get("eager")
    assert isinstance(eager, Backend) and eager.name == "eager" and backends.get("eager") is eager


def test_eager_executable_over_step_graphs(compiled_random):
    model, compiled, _, _ = compiled_random
    exe = compiled.executable
    assert isinstance(exe, Executable) and isinstance(exe, StepProvider)
    assert exe.program.has_step_graphs and exe.num_speculative_tokens == 0 and exe.block_size == 4
    kv, mtp = exe.new_caches(3)
    assert len(kv) == model.config.num_hidden_layers and mtp == [] and kv[0].shape[:2] == (3, 4)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exe.forward(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_without_the_fusion_the_executable_decodes_over_the_main_graph():
    model = random_model(num_hidden_layers=1, first_k_dense_replace=1)
    compiled = graphopt.compile(model, block_size=4, disable_passes=["fuse_spec_step"])
    assert compiled.program.names == ["main"]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert compiled.generate(prompts, max_new_tokens=6) == [greedy_generate(model, p, 6, block_size=4) for p in prompts]
    assert compiled.stats is None


def test_fresh_cache_forward_puts_each_row_in_its_own_consecutive_blocks():
    from graphopt.backends.base import fresh_cache_forward
    from graphopt.step.paged import CacheLayout

    layout = CacheLayout(num_layers=2, block_size=4, kv_cache_dim=3, dtype=torch.float32,
                         device=torch.device("cpu"), num_mtp=1)
    seen = {}

    def main(ids, positions, slots, tables, kv):   # the main graph's signature; logits [B, T, 1] = ids
        seen.update(ids=ids, positions=positions, slots=slots, tables=tables, kv=kv)
        return ids[..., None].float(), None
    ids = torch.arange(18, dtype=torch.int32).view(2, 9)
    assert torch.equal(fresh_cache_forward(main, layout, ids), ids[..., None].float())
    assert seen["ids"].dtype == torch.int32                                     # ids passed as given
    assert seen["tables"].tolist() == [[1, 2, 3], [4, 5, 6]]                    # block 0: the sink
    assert torch.equal(seen["positions"], torch.arange(9).expand(2, 9))
    assert seen["slots"][0].tolist() == list(range(4, 13)) and seen["slots"][1].tolist() == list(range(16, 25))
    assert len(seen["kv"]) == 2 and all(c.shape == (7, 4, 3) and not c.any() for c in seen["kv"])  # no MTP caches
