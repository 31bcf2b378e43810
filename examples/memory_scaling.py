"""Memory scaling (paper §3): fix the backbone, grow the Engram table, and fit
held-out loss against the number of slots with a power law.

The backbone is the rho = 1 tiny Qwen3-MoE of examples/allocation_sweep.py
(same corpus, tokenizer, optimiser and schedule). Engram layers are added at
fixed blocks with :func:`engram.integrations.add_engram_layers`; only the
table's per-head minimum size changes between points, so the dense Engram
parameters (projections, norms, conv) are the same at every size. Tables train
row-wise (``engram.optim``).

Two controls share the plot: the same Engram layers with a table of one row
per head (every n-gram hashes to that row, so the layers keep their dense
parameters but memorise nothing), and the backbone without Engram. The gap
between the one-row control and the sized tables is what memory adds beyond
the extra dense parameters, at this scale.

    python examples/memory_scaling.py --out runs/memory            # default: 16 min measured on 2 shared cores (--threads 1, load 4.5)
    python examples/memory_scaling.py --out runs/memory --quick    # < 3 min, CI

Writes to --out: memory_scaling.json (raw points per seed, the controls, the
fitted exponent and R^2) and memory_scaling.png (log-log plot with the fit).
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
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import allocation_sweep as sweep  # noqa: E402  (corpus, model, training loop)

import engram  # noqa: E402
from engram import integrations, moe  # noqa: E402

DEFAULTS = dict(sweep.DEFAULTS, head_sizes="128,362,1024,2896,8192", steps=500)
QUICK = dict(sweep.QUICK, head_sizes="16,48,128,384,1024", steps=20)


def one_row_per_head(model) -> None:
    """The control: every head of every Engram layer gets a single row (its
    hash is taken mod 1), so each layer looks up K fixed rows per token."""
    for layer in integrations.engram_layers(model).values():
        k = layer.config.num_heads_total
        mhe = layer.multi_head_embedding
        old = mhe.embedding.weight
        layer.hash_sizes = torch.ones_like(layer.hash_sizes)
        mhe.offsets = torch.arange(k, dtype=mhe.offsets.dtype, device=mhe.offsets.device)
        mhe.embedding = nn.Embedding(k, old.shape[1], device=old.device, dtype=old.dtype)


def add_engram(model, args, head_size: int, compression) -> None:
    width, head_dim = args.engram_width, args.engram_head_dim
    cfg = engram.EngramConfig(engram_vocab_size=[head_size, head_size], max_ngram_size=3, n_embed_per_ngram=width,
                              n_head_per_ngram=width // head_dim, layer_ids=args.engram_layer_list, pad_id=2)
    integrations.add_engram_layers(model, cfg, compression=compression)


def fit_power_law(slots: Sequence[float], losses: Sequence[float]) -> Dict[str, float]:
    """Least squares of log(loss) = log(a) + b log(slots): loss = a * slots^b."""
    xs, ys = [math.log(s) for s in slots], [math.log(v) for v in losses]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"exponent": b, "prefactor": math.exp(a), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def plot(path: str, points: List[Dict], controls: Dict[str, Dict], fit: Dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = [p["slots"] for p in points]
    ax.errorbar(xs, [p["val_loss"]["mean"] for p in points], yerr=[p["val_loss"]["std"] for p in points],
                marker="o", capsize=4, lw=0, elinewidth=1.5, label="Engram table, mean ± std over seeds")
    for p in points:
        ax.scatter([p["slots"]] * len(p["val_loss_per_seed"]), p["val_loss_per_seed"], color="gray", s=12, alpha=0.7)
    grid = [min(xs) * (max(xs) / min(xs)) ** (i / 50) for i in range(51)]
    ax.plot(grid, [fit["prefactor"] * g ** fit["exponent"] for g in grid], "--", color="tab:blue",
            label=f"fit: loss ∝ slots^{fit['exponent']:.4f} (R² = {fit['r2']:.3f})")
    styles = {"one_row_per_head": ("tab:orange", "control: one row per head (dense Engram parameters only)"),
              "no_engram": ("tab:red", "control: backbone without Engram")}
    for name, c in controls.items():
        color, label = styles[name]
        m, s = c["val_loss"]["mean"], c["val_loss"]["std"]
        ax.axhline(m, color=color, lw=1.5, label=f"{label}: {m:.3f}")
        ax.axhspan(m - s, m + s, color=color, alpha=0.12)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator

    # A narrow log range gets no major ticks: place plain-number ticks by hand.
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_locator(FixedLocator([lo + (hi - lo) * i / 5 for i in range(6)]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.3f}")
    ax.set_xlabel("Engram slots (table rows, all layers)")
    ax.set_ylabel("held-out cross-entropy (nats / token, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sweep.add_common_arguments(p, DEFAULTS)
    p.add_argument("--head-sizes", help=f"comma-separated minimum rows per hash head (default "
                                        f"{DEFAULTS['head_sizes']}); at least 5 spanning 30x")
    args = sweep.resolve(p.parse_args(argv), DEFAULTS, QUICK)
    sizes = sorted(int(s) for s in str(args.head_sizes).split(","))
    heads = args.engram_width // args.engram_head_dim
    # Slots per size: the distinct primes (spec §2) the tables will get.
    slots = [sum(sum(h) for h in engram._loader.load("_engine").head_primes([s, s], heads, len(args.engram_layer_list)))
             for s in sizes]
    if len(sizes) < 5 or slots[-1] < 30 * slots[0]:
        raise ValueError(f"--head-sizes={args.head_sizes} gives {slots} slots: expected at least 5 sizes whose "
                         "slot counts span at least 30x")
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    wall = time.perf_counter()
    corpus = sweep.load_corpus(args)
    vocab = corpus["tokenizer"].get_vocab_size()

    configs = [("no_engram", None), ("one_row_per_head", sizes[0])] + [(f"head_size={s}", s) for s in sizes]
    bar = tqdm(total=len(configs) * len(args.seed_list) * args.steps, desc="memory scaling", unit="step",
               dynamic_ncols=True)
    results = {}
    for name, size in configs:
        runs, accounting = [], None
        for seed in args.seed_list:
            bar.set_description(f"{name} seed={seed}")
            model = sweep.make_moe_model(args, seed, vocab)
            if size is not None:
                add_engram(model, args, size, corpus["compression"])
                if name == "one_row_per_head":
                    one_row_per_head(model)
                sweep.scale_engram_init(model)
            accounting = moe.count_parameters(model).as_dict()
            runs.append(dict(sweep.train(model, args, corpus, seed, bar), seed=seed))
        losses = [r["val_loss"] for r in runs]
        results[name] = {"head_size": size, "slots": accounting["engram_table"] // args.engram_head_dim,
                         "accounting": accounting, "val_loss_per_seed": losses, "val_loss": sweep.summarize(losses),
                         "runs": runs}
    bar.close()
    points = [results[f"head_size={s}"] for s in sizes]
    controls = {k: results[k] for k in ("one_row_per_head", "no_engram")}
    fit = fit_power_law([q["slots"] for q in points], [q["val_loss"]["mean"] for q in points])
    out = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("seed_list", "engram_layer_list")},
        "model": "Qwen3-MoE (transformers, from a config), rho = 1 backbone",
        "corpus": {"name": "Python standard library source", **corpus["files"], **corpus["tokens"]},
        "points": points,
        "controls": controls,
        "fit": fit,
        "slot_span": points[-1]["slots"] / points[0]["slots"],
        "wall_seconds": time.perf_counter() - wall,
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.out, "memory_scaling.json"), "w") as f:
        json.dump(out, f, indent=1)
    if not args.no_plot and sweep.have_matplotlib():
        backbone = controls["no_engram"]["accounting"]["total"]
        title = (f"Memory scaling: backbone P_tot {backbone / 1e6:.2f} M ({args.experts} experts top-{args.top_k}), "
                 f"Engram at blocks {args.engram_layers}\n{args.steps} steps x {args.batch_size * args.seq_len} "
                 f"tokens, {len(args.seed_list)} seeds, tables row-wise Adam")
        plot(os.path.join(args.out, "memory_scaling.png"), points, controls, fit, title)
    for name, r in results.items():
        print(f"{name:>20}: slots {r['slots']:>8,}  held-out {r['val_loss']['mean']:.4f} ± {r['val_loss']['std']:.4f}")
    print(f"fit: loss ∝ slots^{fit['exponent']:.5f}, R² = {fit['r2']:.3f}; wrote {args.out}/memory_scaling.json "
          f"in {out['wall_seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()
