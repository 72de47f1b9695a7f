"""graphopt.models.train_tiny: the tiny config, the MTP objective, router balancing, a CPU smoke run."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graphopt.cli import main as cli_main
from graphopt.models.deepseek import DeepseekV3ForCausalLM
from graphopt.models.train_tiny import (RouterBalancer, learning_rate, micro_config, route_in_float32,
                                        tiny_config, training_loss)


def _micro_model(seed=0, **overrides):
    return DeepseekV3ForCausalLM(micro_config(**{"vocab_size": 64, **overrides})).init_weights(seed)


def test_tiny_config_is_a_small_deepseek_v3():
    c = tiny_config()
    assert c.model_type == "deepseek_v3" and c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"
    assert c.num_hidden_layers >= 4 and c.first_k_dense_replace == 1 and c.q_lora_rank
    assert c.n_routed_experts >= 8 and c.num_experts_per_tok >= 2 and c.n_shared_experts == 1
    assert c.n_group >= 2 and 1 <= c.topk_group < c.n_group
    assert c.num_nextn_predict_layers == 1 and c.vocab_size == 8192
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(c)
    n = sum(p.numel() for p in model.parameters())  # shared MTP embed/head counted once, as saved
    assert 12e6 <= n and 2 * n <= 31.5e6


def test_loss_falls_on_a_repeated_batch():
    torch.manual_seed(0)
    model = _micro_model()
    ids = torch.randint(3, 64, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    balancer = RouterBalancer(model, seq_aux_alpha=1e-4)
    losses = []
    for _ in range(6):
        balancer.active, balancer.batch_size = True, ids.shape[0]
        loss, parts = training_loss(model, ids, depths=2, mtp_weight=0.3)
        aux = balancer.take_aux_loss()
        balancer.active = False
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        balancer.update_bias(1e-3)
        losses.append(loss.item())
        assert loss.item() == pytest.approx(parts[0].item() + 0.3 * (parts[1].item() + parts[2].item()) / 2)
    assert losses[-1] < losses[0] - 0.3


def test_bf16_autocast_step_with_float32_routers():
    # under autocast the router would return bf16 weights, which the experts' dispatch cannot scatter
    model = _micro_model(seed=3)
    balancer = RouterBalancer(model, seq_aux_alpha=1e-4)
    route_in_float32(model, "cpu")
    balancer.active, balancer.batch_size = True, 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = training_loss(model, torch.randint(3, 64, (2, 16)), depths=2, mtp_weight=0.3)
    (loss + balancer.take_aux_loss()).backward()
    router = balancer.routers[0]
    assert torch.isfinite(loss) and router.weight.grad.abs().sum() > 0
    assert balancer.counts[0].sum() == 2 * 16 * 2
    del router.forward
    assert router.forward.__func__ is type(router).forward


def test_mtp_loss_targets_the_token_after_next():
    # A model whose every head predicts "the token it reads, plus one" is perfect on a counting sequence
    # only if each MTP depth d is scored against token t+1+d with token t+d as its newest input.
    model = _micro_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in [*model.model.layers, *model.mtp]:  # keep norms as identity
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.mtp[0].shared_head.norm.weight.fill_(1.0)
        model.mtp[0].enorm.weight.fill_(1.0)
        eye = torch.eye(64, model.config.hidden_size)     # token i -> basis vector i (hidden >= vocab)
        model.model.embed_tokens.weight.copy_(eye * 8)
        model.lm_head.weight.copy_(torch.roll(eye, 1, dims=0) * 8)  # basis i -> logit of token i+1
        # MTP: h' = eh_proj([enorm(embed(tok)), hnorm(h)]) keeps only the embedding of the token read
        model.mtp[0].eh_proj.weight[:, :model.config.hidden_size].copy_(torch.eye(model.config.hidden_size))
    ids = torch.arange(40)[None] % 64
    _, parts = training_loss(model, ids, depths=2, mtp_weight=0.3)
    # main reads t, predicts t+1: correct. Depth d reads t+d, predicts t+d+1: correct. All near zero.
    assert all(p.item() < 1e-3 for p in parts), [p.item() for p in parts]
    shifted = (ids + 1) % 64                                 # a sequence counting in steps of 2 breaks it
    _, wrong = training_loss(model, torch.cat([ids[:, ::2], shifted[:, ::2]], 1)[:, :40], 2, 0.3)
    assert all(p.item() > 1.0 for p in wrong)


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    model = _micro_model(seed=1)
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias[0] = 1.0   # expert 0 is picked by every token
    balancer = RouterBalancer(model)
    ids = torch.randint(3, 64, (4, 32))

    def load():
        balancer.active, balancer.batch_size = True, 4
        with torch.no_grad():
            model(ids)
        balancer.active = False
        return balancer.counts[0].clone()

    before = load()
    balancer.counts[0].zero_()
    for _ in range(40):
        load()
        balancer.update_bias(0.02)
    after = load()
    assert after.sum() == before.sum() == 4 * 32 * 2
    assert before[0] > 0.8 * 4 * 32 and after[0] < before[0] / 2
    assert after.max() / after.mean() < 1.5 < before.max() / before.mean()
    assert router.e_score_correction_bias[0] < 1.0


def test_sequence_aux_loss_is_alpha_when_balanced_and_has_gradient():
    model = _micro_model(seed=2)
    balancer = RouterBalancer(model, seq_aux_alpha=0.5)
    router = balancer.routers[0]
    x = torch.randn(2 * 8, model.config.hidden_size)
    balancer.batch_size = 2
    with torch.no_grad():
        router.weight.zero_()                            # equal scores: P_e = 1/E
    ids = torch.arange(16 * 2).view(16, 2) % router.weight.shape[0]   # every expert picked equally
    loss = balancer._sequence_loss(router, x, ids)
    assert loss.item() == pytest.approx(0.5)
    router.weight.data.normal_()
    balancer._sequence_loss(router, x, ids).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert learning_rate(99, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    values = [learning_rate(s, 100, 1.0, 10, 0.1) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cli_smoke_run_writes_checkpoint_log_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(3, 8192, 4000).astype("<u2").tofile(corpus / "train.bin")
    rng.integers(3, 8192, 600).astype("<u2").tofile(corpus / "heldout.bin")
    from graphopt.models.tokenizer import load_tokenizer
    load_tokenizer().save(corpus / "tokenizer.json")
    out = tmp_path / "ckpt"
    cli_main(["train-tiny", "--micro", "--device", "cpu", "--corpus", str(corpus), "--out", str(out), "--steps", "4",
          "--batch-size", "2", "--seq-len", "32", "--warmup", "2", "--log-every", "2", "--eval-every", "2",
          "--accept-prompts", "1", "--accept-new-tokens", "8", "--time-budget", "0"])
    log = json.loads((out / "train_log.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tiny_loss.png"} <= {p.name for p in out.iterdir()}
    assert log["steps"] == 4 and log["tokens_seen"] == 4 * 2 * 32 and len(log["evals"]) == 2
    assert log["shipped_step"] in (2, 4)
    assert 1.0 < log["eval"]["perplexity"] < 1e5 and len(log["eval"]["acceptance"]["rates"]) == 3

    from graphopt.models.checkpoint import load
    model = load(out, dtype=torch.float32)
    assert model.config.to_dict() == micro_config().to_dict()
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(3, 8192, (1, 16))
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all() and F.softmax(logits, -1).sum(-1).allclose(torch.ones(1, 16))


def _package_hashes() -> dict[str, str]:
    import hashlib
    from pathlib import Path

    import graphopt

    root = Path(graphopt.__file__).parent
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_corpus_and_train_tiny_write_only_under_the_current_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from graphopt.models import corpus

    lib = tmp_path / "lib"                                    # a stdlib-shaped tree, 10% held out (json/)
    for rel, text in {"os.py": "def add(a, b):\n    return a + b\n" * 300,
                      "collections/abc.py": "class Point:\n    x: int = 0\n" * 300,
                      "json/__init__.py": "import sys\nprint(sys.argv)\n" * 120}.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _package_hashes()
    assert corpus.main(["--stdlib", str(lib), "--vocab-size", "300", "--quiet"]) == 0        # default --out
    assert cli_main(["train-tiny", "--micro", "--device", "cpu", "--steps", "2", "--batch-size", "2",
                     "--seq-len", "16", "--warmup", "1", "--log-every", "1", "--eval-every", "2",
                     "--eval-windows", "2", "--accept-prompts", "1", "--accept-new-tokens", "4",
                     "--time-budget", "0", "--quiet"]) == 0                                    # default --corpus, --out
    assert _package_hashes() == before                        # not one byte of the package changed
    written = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert written == [".cache/corpus/heldout.bin", ".cache/corpus/heldout.txt", ".cache/corpus/meta.json",
                       ".cache/corpus/tokenizer.json", ".cache/corpus/train.bin", "out/tiny/config.json",
                       "out/tiny/model.safetensors", "out/tiny/tiny_loss.png", "out/tiny/tokenizer.json",
                       "out/tiny/train_log.json"]
    assert "train" not in capsys.readouterr().err             # --quiet: no progress bar


def test_train_tiny_refuses_a_missing_corpus_before_building_a_model(tmp_path, capsys):

    assert cli_main(["train-tiny", "--micro", "--corpus", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks train.bin, heldout.bin, tokenizer.json" in err


def test_held_out_evaluation_shows_progress_after_two_seconds_only_when_asked(monkeypatch):
    import contextlib
    import io

    from graphopt.models import train_tiny

    made, real = [], train_tiny.tqdm

    def make(*args, **kwargs):   # bars drawn at once into a buffer, so the test can read them
        made.append({"kwargs": kwargs, "out": io.StringIO()})
        return real(*args, **{**kwargs, "delay": 0, "leave": True, "mininterval": 0, "file": made[-1]["out"]})
    monkeypatch.setattr(train_tiny, "tqdm", make)
    model = _micro_model().eval()
    windows = torch.randint(3, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    shown = train_tiny.heldout_losses(model, windows, 1, 2, contextlib.nullcontext, progress=True)
    assert shown == train_tiny.heldout_losses(model, windows, 1, 2, contextlib.nullcontext)
    assert made[0]["kwargs"]["delay"] == 2.0 and "held-out eval: 100%" in made[0]["out"].getvalue()
    assert "3/3 [" in made[0]["out"].getvalue() and made[1]["out"].getvalue() == ""
