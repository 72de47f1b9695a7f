"""store_int8_kv_cache: with kv_cache="int8" every cache of the Program is an int8 tensor (the C8
latent's codes + the rope bytes), written by kv_int8_entry and read by mla_paged_attention_int8, and
the compiled model computes bit for bit what the C8-emulated float cache computed; a cache it cannot
store as int8 is a clear error, and without C8 nothing changes."""

import pytest
import torch

import graphopt
from graphopt.models.random import random_model
from graphopt.ops.kv_int8 import decode_kv_int8
from graphopt.passes.base import count_ops
from graphopt.passes.store_int8_kv_cache import CUDA_OPT_IN, C8StorageError, int8_storage_on_cuda
from graphopt.quant import PRESETS, CalibrationConfig, QuantConfig

CALIBRATION = CalibrationConfig(sources=(("random", 1.0),), num_samples=2, seq_len=8)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [3, 2, 7, 6, 5]]   # a vocabulary of 8: drafts get accepted and rejected
OFF = ("store_int8_kv_cache",)


def _one_layer():
    """A cheap compile (one dense layer instead of the default three) for tests of one refusal or
    one property of the caches: every layer's cache is handled alike, `pair` covers the full model."""
    return random_model(num_hidden_layers=1)


@pytest.fixture(scope="module")
def pair():
    """(int8-cache compile, the same compile with float caches) of one random model, spec k = 1."""
    model, cfg = random_model(vocab_size=8), PRESETS["w8a8_c8"].replace(calibration=CALIBRATION)
    kw = dict(quant=cfg, block_size=4, progress=False, spec="mtp")
    return graphopt.compile(model, **kw), graphopt.compile(model, disable_passes=OFF, **kw), model


def test_every_cache_is_int8_and_every_graph_reads_it_through_the_int8_op(pair):
    c8, emulated, model = pair
    cfg = model.config
    layout = c8.program.cache
    assert layout.cache_dtype == torch.int8 and layout.dtype == torch.float32        # the model stays float32
    assert layout.kv_cache_dim == cfg.kv_lora_rank + 4 * cfg.qk_rope_head_dim        # codes + float32 rope bytes
    kv, mtp = c8.executable.new_caches(3)
    assert all(t.dtype == torch.int8 and t.shape == (3, 4, layout.kv_cache_dim) for t in (*kv, *mtp))
    for name in c8.program.names:
        ops, before = count_ops(c8.graphs[name]), count_ops(emulated.graphs[name])
        reads = before["graphopt.mla_paged_attention.default"]
        assert reads > 0 and ops["graphopt.mla_paged_attention_int8.default"] == reads, name
        assert "graphopt.mla_paged_attention.default" not in ops, name
        assert ops["graphopt.kv_int8_entry.default"] == before["graphopt.kv_cache_write.default"], name
        assert "graphopt.dequantize_kv.default" not in ops, name          # the float entry is gone
        placeholders = [n.meta["val"] for n in c8.graphs[name].graph.nodes if n.op == "placeholder"]
        assert sum(isinstance(v, torch.Tensor) and v.dtype == torch.int8 for v in placeholders) == \
            before["graphopt.kv_cache_write.default"], name


def test_int8_storage_computes_exactly_what_the_emulated_cache_computed(pair):
    c8, emulated, _ = pair
    x = torch.tensor([[3, 1, 4, 1, 5, 7, 2, 6]])
    assert torch.equal(c8(x), emulated(x))
    # the main graph on its int8 example inputs against the float graph on those caches decoded
    ids, pos, slots, blocks, caches = c8.program.make_inputs["main"](0)
    assert all(c.dtype == torch.int8 for c in caches)
    gm = c8.graphs["main"]
    scales = [getattr(gm, f"_quant_model__layers__{i}__self_attn__kv_a_layernorm_kv_scale") for i in range(len(caches))]
    floats = [decode_kv_int8(c, s, torch.float32) for c, s in zip(caches, scales)]
    with torch.no_grad():
        got, want = gm(ids, pos, slots, blocks, caches), emulated.graphs["main"](ids, pos, slots, blocks, floats)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(decode_kv_int8(c, s, torch.float32), f) for c, s, f in zip(caches, scales, floats))  # same writes
    assert c8.generate(PROMPTS, 16, ignore_eos=True) == emulated.generate(PROMPTS, 16, ignore_eos=True)
    assert 0 < c8.stats["accepted"] < c8.stats["proposed"]            # drafts verified over the int8 cache


def test_bytes_per_token_are_reported_and_smaller(pair):
    c8, emulated, model = pair
    now, was = c8.program.cache.bytes_per_token(False), emulated.program.cache.bytes_per_token(False)
    cfg = model.config
    assert now == cfg.num_hidden_layers * (cfg.kv_lora_rank + 4 * cfg.qk_rope_head_dim)
    assert was == cfg.num_hidden_layers * 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert f"{now} bytes per token" in c8.report.notes["program/store_int8_kv_cache"]


def test_the_artefact_keeps_the_int8_layout(pair, tmp_path):
    c8 = pair[0]
    c8.save(tmp_path / "c8")
    back = graphopt.load_compiled(tmp_path / "c8")
    assert back.program.cache == c8.program.cache
    assert back.generate(PROMPTS, 8, ignore_eos=True) == c8.generate(PROMPTS, 8, ignore_eos=True)


def test_without_c8_the_caches_stay_float():
    compiled = graphopt.compile(_one_layer(), quant=QuantConfig("w8a8"), block_size=4, progress=False)
    assert compiled.program.cache.cache_dtype is None
    assert "graphopt.mla_paged_attention_int8.default" not in count_ops(compiled.graphs["main"])


def test_a_cache_read_without_the_paged_op_is_a_clear_error():
    cfg = PRESETS["c8"].replace(calibration=CALIBRATION)
    with pytest.raises(Exception, match="store_int8_kv_cache: graph 'main'.*reads the cache kv_caches_0") as e:
        graphopt.compile(_one_layer(), quant=cfg, block_size=4, progress=False, disable_passes=("use_paged_attention",))
    assert isinstance(e.value, C8StorageError) or isinstance(e.value.__cause__, C8StorageError)


def test_verify_mode_checks_the_int8_graphs():
    cfg = PRESETS["c8"].replace(calibration=CALIBRATION)
    compiled = graphopt.compile(random_model(num_hidden_layers=2), quant=cfg, block_size=4, progress=False, verify=True)
    assert compiled.program.cache.cache_dtype == torch.int8


def test_the_onnx_backend_refuses_int8_caches_by_name():
    pytest.importorskip("onnx")
    cfg = PRESETS["c8"].replace(calibration=CALIBRATION)
    with pytest.raises(ValueError, match="onnx backend does not take torch.int8 caches"):
        graphopt.compile(_one_layer(), quant=cfg, block_size=4, progress=False, backend="onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_c8_keeps_the_emulated_cache_the_mla_kernel_reads_and_says_so():
    model = random_model(vocab_size=8).to("cuda", torch.float32)
    kw = dict(quant=PRESETS["w8a8_c8"].replace(calibration=CALIBRATION), block_size=4, progress=False, spec="mtp")
    c8 = graphopt.compile(model, backend="inductor", **kw)
    kv, _ = c8.executable.new_caches(2)
    assert kv[0].dtype == torch.float32 and c8.program.cache.cache_dtype is None
    assert any("C8 on CUDA keeps its emulated layout" in note for note in c8.program.state.notes.values())
    floats = graphopt.compile(model, backend="inductor", disable_passes=OFF, **kw)
    assert c8.generate(PROMPTS, 16, ignore_eos=True) == floats.generate(PROMPTS, 16, ignore_eos=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_int8_caches_read_by_the_triton_kernel_decode_the_emulated_caches_tokens(monkeypatch, dtype):
    """Opted in: int8 caches on CUDA, read by the Triton kernel, CUDA graphs on; the tokens equal those of
    the emulated float cache (the same values reach the same kernel arithmetic)."""
    monkeypatch.setenv(CUDA_OPT_IN, "1")
    model = random_model(vocab_size=8).to("cuda", dtype)
    kw = dict(quant=PRESETS["w8a8_c8"].replace(calibration=CALIBRATION), block_size=4, progress=False, spec="mtp")
    c8 = graphopt.compile(model, backend="inductor", **kw)
    kv, _ = c8.executable.new_caches(2)
    assert kv[0].dtype == torch.int8 and c8.program.cache.cache_dtype == torch.int8
    assert "graphopt.mla_paged_attention_int8.default" in count_ops(c8.graphs["main"])
    floats = graphopt.compile(model, backend="inductor", disable_passes=OFF, **kw)
    assert c8.generate(PROMPTS, 16, ignore_eos=True) == floats.generate(PROMPTS, 16, ignore_eos=True)


def test_int8_storage_on_cuda_is_opt_in_by_environment(monkeypatch):
    monkeypatch.delenv(CUDA_OPT_IN, raising=False)
    assert not int8_storage_on_cuda()
    for value, on in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(CUDA_OPT_IN, value)
        assert int8_storage_on_cuda() is on


def test_without_in_place_writes_there_is_nothing_to_store_and_it_says_so():
    cfg = PRESETS["c8"].replace(calibration=CALIBRATION)
    with pytest.raises(Exception, match="has no in-place cache write .* needs reinplace_cache_writes") as e:
        graphopt.compile(_one_layer(), quant=cfg, block_size=4, progress=False,
                         disable_passes=("reinplace_cache_writes",))
    assert isinstance(e.value, C8StorageError) or isinstance(e.value.__cause__, C8StorageError)
