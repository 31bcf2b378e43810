"""Allocation sweep (paper §3): trade routed experts for Engram memory at equal
total parameters and train each split on the same data.

A tiny Qwen3-MoE decoder (transformers, built from a config) is the rho = 1
model. For every other rho, :func:`engram.moe.plan` keeps ``k + rho (E - k)``
routed experts per layer and turns the freed parameters into an Engram table
at the chosen blocks; :func:`engram.moe.swap_experts_for_engram` applies it.
Every point starts from the same initial weights (the kept experts are the
first ones of the same seeded model), sees the same batches for the same
number of steps, and runs for every seed. The Engram tables train row-wise
(``engram.optim``), the rest with AdamW.

The corpus is the Python standard library's source, as in
examples/train_tiny_lm.py (nothing is downloaded): a BPE tokenizer is trained
on the training files, held-out files are never trained on.

    python examples/allocation_sweep.py --out runs/alloc            # default: 15 min measured on 2 shared cores (--threads 1, load 4.5)
    python examples/allocation_sweep.py --out runs/alloc --quick    # < 3 min, CI

Writes to --out: allocation.json (per point: the plan, the parameter
accounting, held-out loss per seed, times) and allocation.png (held-out loss
against rho, mean and spread over seeds, with each point's rise in activated
parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tiny_lm as tiny  # noqa: E402  (corpus, tokenizer and lr schedule helpers)

import engram  # noqa: E402
from engram import moe  # noqa: E402

DEFAULTS = dict(
    rhos="1.0,0.9,0.8,0.6,0.4", seeds="0,1", steps=600, batch_size=16, seq_len=64, hidden=64, layers=4, heads=4,
    experts=16, top_k=2, expert_size=64, vocab_size=2048, engram_layers="1", engram_width=32, engram_head_dim=8,
    max_files=None, eval_windows=256, lr=3e-3, warmup=60,
)
QUICK = dict(
    rhos="1.0,0.8,0.4", seeds="0,1", steps=25, batch_size=8, seq_len=32, hidden=32, layers=2, heads=2,
    experts=8, top_k=2, expert_size=32, vocab_size=512, engram_layers="1", engram_width=16, engram_head_dim=4,
    max_files=40, eval_windows=24, lr=3e-3, warmup=5,
)


def add_common_arguments(p: argparse.ArgumentParser, defaults: Dict) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (CI): well under 3 minutes")
    p.add_argument("--seeds", help=f"comma-separated seeds (default {defaults['seeds']})")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--hidden", type=int, help="hidden size of the MoE decoder")
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--experts", type=int, help="routed experts per layer of the rho = 1 model")
    p.add_argument("--top-k", type=int)
    p.add_argument("--expert-size", type=int, help="moe_intermediate_size of one expert")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    p.add_argument("--engram-layers", help="comma-separated block ids that get an Engram layer")
    p.add_argument("--engram-width", type=int, help="n_embed_per_ngram")
    p.add_argument("--engram-head-dim", type=int, help="width of one hashed head")
    p.add_argument("--max-files", type=int, help="use an evenly spaced subset of the stdlib files")
    p.add_argument("--eval-windows", type=int, help="held-out windows of --seq-len tokens")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--table-lr-mult", type=float, default=5.0, help="Engram table learning rate / --lr")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (also skipped when matplotlib is missing)")


def resolve(args: argparse.Namespace, defaults: Dict, quick: Dict) -> argparse.Namespace:
    base = quick if args.quick else defaults
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.seed_list = [int(s) for s in str(args.seeds).split(",")]
    args.engram_layer_list = [int(s) for s in str(args.engram_layers).split(",")]
    return args


# --------------------------------------------------------------------------
# data, model, training (shared with memory_scaling.py)
# --------------------------------------------------------------------------


def load_corpus(args) -> Dict:
    files = tiny.stdlib_files(max_files=args.max_files)
    train_files, val_files = tiny.split_files(files, 0.1, seed=0)
    train_texts = tiny.read_texts(train_files)
    tok = tiny.train_tokenizer(train_texts, args.vocab_size)
    compression, _ = tiny.build_compression(tok)
    train = tiny.encode_stream(tok, train_texts)
    val = tiny.encode_stream(tok, tiny.read_texts(val_files))
    return {"tokenizer": tok, "compression": compression, "train": train,
            "val_windows": tiny.eval_windows(val, args.eval_windows, args.seq_len),
            "files": {"train": len(train_files), "held_out": len(val_files)},
            "tokens": {"train": int(train.numel()), "held_out": int(val.numel())}}


def make_moe_model(args, seed: int, vocab: int):
    """The rho = 1 model: a tiny Qwen3-MoE decoder, same weights for a seed."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_size,
        max_position_embeddings=max(512, args.seq_len), pad_token_id=2, bos_token_id=0, eos_token_id=tiny.EOS_ID,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    try:  # fused grouped GEMMs: ~3x faster than the per-expert loop on CPU
        model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm")
    except (ValueError, ImportError):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model


def scale_engram_init(model) -> None:
    """Rows at the token embeddings' scale and a silent conv branch, for a
    residual stream of scale 0.02 (the reason is spelled out in
    train_tiny_lm.TinyLM.add_engram)."""
    std = model.config.initializer_range
    for layer in engram.integrations.engram_layers(model).values():
        torch.nn.init.normal_(layer.multi_head_embedding.embedding.weight, std=std)
        torch.nn.init.zeros_(layer.short_conv.conv.weight)


def make_optimizers(model, args) -> List[torch.optim.Optimizer]:
    tables = {id(m.multi_head_embedding.embedding.weight) for m in model.modules() if isinstance(m, engram.EngramLayer)}
    decay = [p for p in model.parameters() if id(p) not in tables and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if id(p) not in tables and p.dim() < 2]
    opts = [torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95))]
    if tables:  # row-wise: the update happens in backward, only for the rows looked up
        opts.append(engram.optim.make_rowwise(model, "adam", lr=args.lr * args.table_lr_mult, betas=(0.9, 0.95)))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def train(model, args, corpus: Dict, seed: int, bar=None) -> Dict:
    """Trains on batches drawn by ``seed`` (the same for every point), returns
    the held-out loss and times."""
    model.train()
    opts = make_optimizers(model, args)
    gen = torch.Generator().manual_seed(1000 + seed)
    start = time.perf_counter()
    last = float("nan")
    for step in range(args.steps):
        factor = tiny.lr_factor(step, args.steps, args.warmup)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        batch = tiny.random_batch(corpus["train"], args.batch_size, args.seq_len, gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        for opt in opts:
            opt.step()
        last = loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_loss=f"{last:.3f}", refresh=False)
    train_s = time.perf_counter() - start
    val = evaluate(model, corpus["val_windows"], 2 * args.batch_size)
    return {"val_loss": val, "final_train_loss": last, "train_seconds": train_s,
            "eval_seconds": time.perf_counter() - start - train_s}


def summarize(losses: Sequence[float]) -> Dict[str, float]:
    n = len(losses)
    mean = sum(losses) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(losses), "max": max(losses)}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return False
    return True


# --------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------


def plot_allocation(path: str, points: List[Dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = [100 * p["rho_effective"] for p in points]
    means = [p["val_loss"]["mean"] for p in points]
    spread = [p["val_loss"]["std"] for p in points]
    ax.errorbar(xs, means, yerr=spread, marker="o", capsize=4, lw=2, label="held-out loss, mean ± std over seeds")
    for p, x in zip(points, xs):
        ax.scatter([x] * len(p["val_loss_per_seed"]), p["val_loss_per_seed"], color="gray", s=12, alpha=0.7, zorder=3)
        ax.annotate(f"{p['experts']} exp.\nP_act {100 * p['activated_change']:+.1f}%", (x, p["val_loss"]["mean"]),
                    textcoords="offset points", xytext=(0, 12), ha="center", fontsize=7)
    ax.set_xlabel("rho: share of sparse parameters in routed experts (%)")
    ax.set_ylabel("held-out cross-entropy (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_arguments(p, DEFAULTS)
    p.add_argument("--rhos", help=f"comma-separated rho values (default {DEFAULTS['rhos']})")
    args = resolve(p.parse_args(argv), DEFAULTS, QUICK)
    rhos = [float(r) for r in str(args.rhos).split(",")]
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    wall = time.perf_counter()
    corpus = load_corpus(args)
    vocab = corpus["tokenizer"].get_vocab_size()

    # Plans first, so that a rho the model cannot take fails before training.
    plans = {}
    for rho in rhos:
        base = make_moe_model(args, 0, vocab)
        plans[rho] = None if rho == 1.0 else moe.plan(
            base, rho, engram_layers=args.engram_layer_list, engram_width=args.engram_width,
            head_dim=args.engram_head_dim, pad_id=2)
    reference = moe.count_parameters(make_moe_model(args, 0, vocab))

    points = []
    bar = tqdm(total=len(rhos) * len(args.seed_list) * args.steps, desc="allocation sweep", unit="step",
               dynamic_ncols=True)
    for rho in rhos:
        runs, accounting, plan = [], None, plans[rho]
        for seed in args.seed_list:
            bar.set_description(f"rho={rho:g} seed={seed}")
            model = make_moe_model(args, seed, vocab)
            if plan is not None:
                moe.swap_experts_for_engram(model, plan, compression=corpus["compression"])
                scale_engram_init(model)
            accounting = moe.count_parameters(model).as_dict()
            runs.append(train(model, args, corpus, seed, bar))
        losses = [r["val_loss"] for r in runs]
        points.append({
            "rho": rho,
            "rho_effective": 1.0 if plan is None else plan.rho_effective,
            "experts": args.experts if plan is None else next(iter(plan.experts.values())),
            "engram_table_rows": 0 if plan is None else sum(sum(s) for s in plan.head_sizes.values()),
            "accounting": accounting,
            "total_change": (accounting["total"] - reference.total) / reference.total,
            "activated_change": (accounting["activated"] - reference.activated) / reference.activated,
            "val_loss_per_seed": losses,
            "val_loss": summarize(losses),
            "runs": [dict(r, seed=s) for r, s in zip(runs, args.seed_list)],
            "plan": None if plan is None else plan.summary(),
        })
    bar.close()
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("seed_list", "engram_layer_list")},
        "model": "Qwen3-MoE (transformers, from a config)",
        "corpus": {"name": "Python standard library source", **corpus["files"], **corpus["tokens"]},
        "reference_accounting": reference.as_dict(),
        "points": points,
        "best_rho": min(points, key=lambda q: q["val_loss"]["mean"])["rho"],
        "wall_seconds": time.perf_counter() - wall,
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.out, "allocation.json"), "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plot and have_matplotlib():
        title = (f"Allocation at P_tot = {reference.total / 1e6:.2f} M (embeddings excluded), {args.experts} experts "
                 f"top-{args.top_k},\n{args.steps} steps x {args.batch_size * args.seq_len} tokens, "
                 f"{len(args.seed_list)} seeds")
        plot_allocation(os.path.join(args.out, "allocation.png"), points, title)
    for q in points:
        print(f"rho={q['rho']:.2f} (effective {q['rho_effective']:.3f}, {q['experts']} experts): held-out "
              f"{q['val_loss']['mean']:.4f} ± {q['val_loss']['std']:.4f}  P_tot {100 * q['total_change']:+.2f}%  "
              f"P_act {100 * q['activated_change']:+.2f}%")
    print(f"wrote {args.out}/allocation.json in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
