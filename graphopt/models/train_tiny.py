"""Train the embedded default model: a small but complete DeepSeek-V3 on the Python standard library.

The model (`tiny_config`) has every feature of the architecture: MLA with a query low-rank
projection, a dense first layer then MoE layers (16 routed experts in 4 groups, top-2 within the best
2 groups, one shared expert, sigmoid scores with the noaux_tc correction bias) and one MTP module. In
bfloat16, without the MTP module's copies of the embedding and head, it is about 30 MB on disk.

Objective (DeepSeek-V3 report, section 2.2): next-token cross-entropy plus
`mtp_weight * mean over d = 1..D` of the cross-entropy of MTP depth d, which predicts token t+1+d.
There is ONE MTP module; depth d > 1 runs it again on its own previous output hidden state
(`evaluate.multi_token_logits`), which is how it is used to draft k > 1 tokens at inference, so we
train it that way (D = 2 by default). mtp_weight = 0.3 is DeepSeek-V3's value for the first 10T
tokens; we keep the larger value because drafting quality is what this model ships for (the report
finds the MTP objective does not hurt, and mostly helps, the main model).

Expert balance, the auxiliary-loss-free way (report 2.1.2): after every optimizer step each MoE
router's `e_score_correction_bias` moves by `bias_gamma * sign(mean load - load_e)`, the load being
the number of tokens that picked expert e in that step (counted by forward hooks on the routers; the
MTP module's router included). The bias only shifts which experts are chosen, never their weights.
A sequence-wise balance loss with the report's tiny alpha = 1e-4 guards against one sequence
collapsing onto few experts; `--seq-aux-alpha 0` turns it off.

Recipe: random windows of `seq_len` tokens from train.bin; AdamW (betas 0.9/0.95, weight decay 0.1 on
matrices only); linear warm-up then cosine decay to `min_lr_ratio` of the peak; bf16 autocast on CUDA
with float32 master weights; gradient clipping at 1.0. The train split is small (about 2.9M tokens,
176 steps of 32 x 512 tokens an epoch) and the model overfits it after about 6 epochs, so the
held-out loss is measured every `eval_every` steps and the weights of the best held-out point are
kept (`--no-keep-best` ships the last step instead). `--time-budget` cuts the step count after a
short probe if the run would not fit (the cosine is then laid over the shorter run); the defaults
are the shipped run's and take under 3 minutes of training on an H200 (docs/embedded_model.md).
Seeded (weights, data order); CUDA kernels are not bitwise deterministic.

    python -m graphopt.models.corpus --out .cache/corpus     # once
    graphopt train-tiny --corpus .cache/corpus --out out/tiny  # docs/embedded_model.md: the exact run

Both write only where they are told (defaults under the current directory), never into the
installed package; shipping a new embedded model is copying out/tiny into graphopt/models/tiny.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import DeepseekV3Config
from .deepseek import DeepseekV3ForCausalLM, TopkRouter
from .evaluate import heldout_prompts, mtp_acceptance, mtp_top1_accuracy, multi_token_logits, perplexity
from .fileio import write_file_atomically

__all__ = ["RouterBalancer", "micro_config", "route_in_float32", "tiny_config", "train", "training_loss"]


def tiny_config(**overrides) -> DeepseekV3Config:
    """The shipped model's shape: 14.9M parameters, 29.9 MB in bf16 (MTP without embed/head copies)."""
    base = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=112,
                num_hidden_layers=6, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="noaux_tc",
                scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=2048,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=0, pad_token_id=2)
    return DeepseekV3Config(**{**base, **overrides})


def micro_config(**overrides) -> DeepseekV3Config:
    """The same architecture at toy size, for CPU smoke runs and tests."""
    return tiny_config(**{**dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                                 n_group=2, topk_group=1), **overrides})


class RouterBalancer:
    """Counts each MoE router's expert picks and applies DeepSeek-V3's two balancing mechanisms.

    Counting and the sequence-wise loss run only while `active` (training forwards), so evaluation
    forwards neither move the bias nor add loss terms. `batch_size` must be set before a forward: the
    routers see flattened tokens [B * T, H] and the sequence-wise loss needs the sequences back.
    """

    def __init__(self, model: DeepseekV3ForCausalLM, seq_aux_alpha: float = 0.0):
        self.routers = [m for m in model.modules() if isinstance(m, TopkRouter)]
        self.counts = [torch.zeros_like(r.e_score_correction_bias) for r in self.routers]
        self.seq_aux_alpha = seq_aux_alpha
        self.active = False
        self.batch_size = 1
        self._aux: list[torch.Tensor] = []
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(router: TopkRouter, inputs, output) -> None:
            if not self.active:
                return
            _, ids = output                                                        # [N, k]
            n_experts = router.weight.shape[0]
            self.counts[i] += torch.bincount(ids.flatten(), minlength=n_experts).to(self.counts[i].dtype)
            if self.seq_aux_alpha:
                self._aux.append(self._sequence_loss(router, inputs[0], ids))
        return hook

    def _sequence_loss(self, router: TopkRouter, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # L = alpha * sum_e f_e * P_e per sequence: f_e = E/(k T) * picks of e, P_e = mean normalised score
        E, k = router.weight.shape[0], ids.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), router.weight.float()))      # [N, E]
        scores = (scores / scores.sum(-1, keepdim=True)).view(self.batch_size, -1, E)  # [B, T, E]
        T = scores.shape[1]
        picks = torch.zeros(self.batch_size, E, device=x.device).scatter_add_(
            1, ids.view(self.batch_size, T * k), torch.ones(self.batch_size, T * k, device=x.device))
        f = picks * E / (k * T)
        return self.seq_aux_alpha * (f * scores.mean(1)).sum(-1).mean()

    def take_aux_loss(self) -> torch.Tensor | float:
        loss = sum(self._aux) if self._aux else 0.0
        self._aux = []
        return loss

    def imbalance(self) -> float:
        """Largest max-load / mean-load over the routers since the last update (1.0 = balanced)."""
        return max(float(c.max() / c.mean().clamp(min=1)) for c in self.counts)

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """bias_e += gamma * sign(mean load - load_e), then start counting afresh."""
        for router, counts in zip(self.routers, self.counts):
            router.e_score_correction_bias += gamma * torch.sign(counts.mean() - counts)
            counts.zero_()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def route_in_float32(model: DeepseekV3ForCausalLM, device_type: str) -> None:
    """Run every MoE router outside autocast (undone by `del router.forward`).

    Why: noaux_tc compares biased sigmoid scores that bf16 cannot tell apart, and the routing
    weights must stay float32 for the experts' dispatch (`routing.scatter` needs matching dtypes).
    """
    for router in model.modules():
        if isinstance(router, TopkRouter):
            def forward(x, _plain=router.forward):
                with torch.autocast(device_type, enabled=False):
                    return _plain(x)
            router.forward = forward


def training_loss(model: DeepseekV3ForCausalLM, ids: torch.Tensor, depths: int, mtp_weight: float
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """main CE + mtp_weight * mean_d CE_d; returns (loss, [main CE, CE_1 .. CE_D]) on ids [B, T]."""
    parts = [F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
             for logits, targets in multi_token_logits(model, ids, depths)]
    mtp = torch.stack(parts[1:]).mean() if depths else 0.0
    return parts[0] + mtp_weight * mtp, parts


def learning_rate(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from peak to min_ratio * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def sample_windows(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len] int64 windows starting at uniform random offsets of data [N]."""
    starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=gen, device=data.device)
    return data[starts[:, None] + torch.arange(seq_len, device=data.device)]


@torch.no_grad()
def heldout_losses(model: DeepseekV3ForCausalLM, windows: torch.Tensor, depths: int, batch_size: int,
                   autocast, progress: bool = False) -> list[float]:
    """Mean [main CE, CE_1 .. CE_D] over windows [n, T] (non-overlapping, each scored on its own)."""
    totals = torch.zeros(depths + 1, dtype=torch.float64)
    # below the train bar, after 2 s; gone when done
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="held-out eval", unit="batch", delay=2.0,
                      leave=False, disable=not progress):
        with autocast():
            _, parts = training_loss(model, windows[start:start + batch_size], depths, 0.0)
        totals += torch.stack(parts).double().cpu() * (min(batch_size, windows.shape[0] - start))
    return (totals / windows.shape[0]).tolist()


def _load_tokens(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype="<u2").astype(np.int64))


def train(args: argparse.Namespace) -> dict:
    """The whole run; returns the train_log dict (also written next to the weights)."""
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    config = micro_config() if args.micro else tiny_config()
    train_ids = _load_tokens(args.corpus / "train.bin")
    heldout_ids = _load_tokens(args.corpus / "heldout.bin")
    n_eval = heldout_ids.numel() // args.seq_len if args.eval_windows is None else args.eval_windows
    eval_windows = heldout_ids[: n_eval * args.seq_len].view(n_eval, args.seq_len).to(device)
    data = train_ids.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    model = DeepseekV3ForCausalLM(config).init_weights(args.seed).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    route_in_float32(model, device.type)
    balancer = RouterBalancer(model, args.seq_aux_alpha)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]                    # norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    steps, tokens_per_step = args.steps, args.batch_size * args.seq_len
    history, evals, best = [], [], {"loss": math.inf, "step": None, "state": None}
    sums, n_sum, t_log = torch.zeros(args.mtp_depths + 2, device=device), 0, time.perf_counter()
    t_train = time.perf_counter()

    eval_seconds = 0.0

    def evaluate_now(step: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        model.eval()
        losses = heldout_losses(model, eval_windows, args.mtp_depths, args.batch_size, autocast,
                                progress=not getattr(args, "quiet", False))
        model.train()
        eval_seconds += time.perf_counter() - t0
        evals.append({"step": step, "tokens": step * tokens_per_step, "heldout": losses})
        tqdm.write(f"eval step {step}: held-out main {losses[0]:.4f} "
                   + " ".join(f"mtp{d} {x:.4f}" for d, x in enumerate(losses[1:], 1)))
        if args.keep_best and losses[0] < best["loss"]:
            best.update(loss=losses[0], step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    step = 0
    # a bar on stderr once the run takes more than 2 s; the step logs print above it
    bar = tqdm(total=steps, desc="train", unit="step", delay=2.0, disable=getattr(args, "quiet", False))
    while step < steps:
        lr = learning_rate(step, steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = sample_windows(data, args.batch_size, args.seq_len, gen)
        balancer.active, balancer.batch_size = True, args.batch_size
        with autocast():
            loss, parts = training_loss(model, ids, args.mtp_depths, args.mtp_weight)
        aux = balancer.take_aux_loss()
        balancer.active = False
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sums += torch.stack([loss.detach(), *(p.detach() for p in parts)])
        n_sum += 1
        step += 1
        bar.update()
        if step == args.probe_steps and args.time_budget:  # fit the run into the time budget
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t_train) / step
            if per_step * steps > args.time_budget:
                steps = max(step, int(args.time_budget / per_step))
                tqdm.write(f"time budget {args.time_budget:.0f} s at {per_step * 1e3:.0f} ms/step: "
                           f"{args.steps} -> {steps} steps")
                bar.total = steps
                bar.refresh()
        log_now = step % args.log_every == 0 or step == steps
        imbalance = balancer.imbalance() if log_now else None  # before the update resets the counts
        balancer.update_bias(args.bias_gamma)
        if log_now:
            means = (sums / n_sum).tolist()
            elapsed = time.perf_counter() - t_log
            record = {"step": step, "tokens": step * tokens_per_step, "lr": lr, "loss": means[0],
                      "main": means[1], "mtp": means[2:], "router_imbalance": imbalance,
                      "tokens_per_s": n_sum * tokens_per_step / elapsed}
            history.append(record)
            tqdm.write(f"step {step}/{steps} loss {means[0]:.4f} main {means[1]:.4f} mtp "
                       + " ".join(f"{x:.4f}" for x in means[2:])
                       + f" lr {lr:.2e} imbalance {imbalance:.2f} {record['tokens_per_s'] / 1e3:.0f}k tok/s")
            sums.zero_()
            n_sum, t_log = 0, time.perf_counter()
        if step % args.eval_every == 0 or step == steps:
            evaluate_now(step)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t_train
    balancer.remove()
    for router in balancer.routers:
        del router.forward  # back to the class's forward

    shipped_step = best["step"] if args.keep_best and best["step"] is not None else steps
    if shipped_step != steps:
        model.load_state_dict(best["state"])
        print(f"restored the weights of step {shipped_step} (best held-out loss {best['loss']:.4f})")
    log = {"config": config.to_dict(), "parameters": n_params, "seed": args.seed,
           "hyper_parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "steps": steps, "shipped_step": shipped_step, "tokens_seen": steps * tokens_per_step,
           "epochs": steps * tokens_per_step / train_ids.numel(), "train_tokens": train_ids.numel(),
           "final_train_losses": {"loss": history[-1]["loss"], "main": history[-1]["main"],
                                  "mtp": history[-1]["mtp"]},
           "heldout_at_shipped_step": next(e["heldout"] for e in evals if e["step"] == shipped_step),
           "train_seconds": train_seconds, "heldout_eval_seconds": eval_seconds,
           "tokens_per_s": steps * tokens_per_step / (train_seconds - eval_seconds),
           "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "history": history, "evals": evals}
    _save(model, args, log)
    log["eval"] = final_evaluation(model, heldout_ids, args)
    log["wall_seconds"] = time.perf_counter() - t_start
    write_file_atomically(args.out / "train_log.json", (json.dumps(log, indent=1) + "\n").encode("utf-8"))
    plot_losses(log, args.plot or args.out / "tiny_loss.png")
    return log


def _save(model: DeepseekV3ForCausalLM, args: argparse.Namespace, log: dict) -> None:
    """bf16 checkpoint; routers stay float32 (noaux_tc selection compares biased scores finely)."""
    from .checkpoint import save

    routers = {n: {k: t.detach().clone() for k, t in [*m.named_parameters(), *m.named_buffers()]}
               for n, m in model.named_modules() if isinstance(m, TopkRouter)}
    model.to(torch.bfloat16)
    with torch.no_grad():
        for name, tensors in routers.items():
            router = model.get_submodule(name)
            router.weight.data = tensors["weight"]
            router.e_score_correction_bias = tensors["e_score_correction_bias"]
    save(model, args.out, mtp_shared_tensors=False, tokenizer=args.corpus / "tokenizer.json")
    # evaluate exactly the shipped weights, in float32 (rope tables recomputed in float32)
    model.float()
    model.model.rotary_emb.reset_parameters()


@torch.no_grad()
def final_evaluation(model: DeepseekV3ForCausalLM, heldout_ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Held-out perplexity, MTP top-1 accuracy and greedy acceptance of the saved weights (float32)."""
    model.eval()
    ids = heldout_ids if args.eval_windows is None else heldout_ids[: args.eval_windows * args.seq_len]
    progress = not getattr(args, "quiet", False)
    t0 = time.perf_counter()
    out = {"heldout_tokens": ids.numel(), "window": args.seq_len,
           "perplexity": perplexity(model, ids, args.seq_len, progress=progress),
           "top1": mtp_top1_accuracy(model, ids, args.seq_len, depths=args.mtp_depths, progress=progress)}
    prompts = heldout_prompts(heldout_ids, args.accept_prompts, 64)
    out["acceptance"] = mtp_acceptance(model, prompts, k_max=3, new_tokens=args.accept_new_tokens,
                                       progress=progress)
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in out.items()}, indent=1), flush=True)
    return out


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, evals = log["history"], log["evals"]
    tokens = [h["tokens"] / 1e6 for h in hist]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(tokens, [h["main"] for h in hist], label="train: main (token t+1)", color="C0")
    for d in range(len(hist[0]["mtp"])):
        ax.plot(tokens, [h["mtp"][d] for h in hist], label=f"train: MTP depth {d + 1} (t+{d + 2})",
                color=f"C{d + 1}", alpha=0.8)
    ev_tokens = [e["tokens"] / 1e6 for e in evals]
    ax.plot(ev_tokens, [e["heldout"][0] for e in evals], "o--", color="C0", label="held-out: main")
    for d in range(1, len(evals[0]["heldout"])):
        ax.plot(ev_tokens, [e["heldout"][d] for e in evals], "s--", color=f"C{d}", markersize=4,
                label=f"held-out: MTP depth {d}")
    shipped = log["shipped_step"] * log["hyper_parameters"]["batch_size"] * log["hyper_parameters"]["seq_len"] / 1e6
    ax.axvline(shipped, color="grey", linestyle=":", label="shipped weights")
    ax.set_xlabel(f"training tokens (M); one epoch = {log['train_tokens'] / 1e6:.2f}M")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_ylim(top=min(8.0, max(h["main"] for h in hist[1:] or hist) + 0.5))
    ax.set_title(f"graphopt tiny DeepSeek-V3 ({log['parameters'] / 1e6:.1f}M params) on the stdlib")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_file_atomically(path, png.getvalue())


def run_cli(args: argparse.Namespace) -> int:
    """`graphopt train-tiny` with parsed (and validated) arguments; they are declared in graphopt/cli.py."""
    log = train(args)
    print(f"done: {log['steps']} steps, {log['tokens_seen'] / 1e6:.1f}M tokens, {log['train_seconds']:.0f} s "
          f"training, {log['wall_seconds']:.0f} s total; held-out ppl {log['eval']['perplexity']:.3f}")
    return 0


