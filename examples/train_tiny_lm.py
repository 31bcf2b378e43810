"""Train a tiny decoder-only LM with and without Engram layers, side by side.

The corpus is the Python standard library's own source (found with
``sysconfig``, so nothing is downloaded); a byte-level BPE tokenizer is trained
on the training files on the fly and the library's tokenizer compression
(spec §1) maps its ids to canonical ids for hashing. Both models share the
backbone, its initial weights, the seed, the batches and the step count; the
Engram model adds Engram layers at two depths. Held-out files never appear in
training (the split is by file, not by line).

    python examples/train_tiny_lm.py --out runs/tiny        # ~5 min on 2 CPU cores
    python examples/train_tiny_lm.py --out runs/gpu --device cuda --d-model 512 --layers 8 \
        --steps 3000 --batch-size 64 --seq-len 256 --vocab-size 8192 --engram-layers 1,5
    torchrun --nproc-per-node 2 examples/train_tiny_lm.py --out runs/sharded --shard-tables \
        --table-optim rowwise-adam      # tables row-sharded over 2 processes (gloo on CPU)

With --shard-tables (under torchrun) the Engram tables are row-sharded over
the ranks (engram.distributed.shard_tables), the dense weights train with DDP
(the tables left out of it), and each rank takes its slice of the global
--batch-size, so the run follows the one-process run at the same batch size.

Writes to --out: loss_curves.png, gate_heatmap.png, metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import engram
from engram.integrations import record_gates

# Folders of the stdlib tree that are not the library itself: third-party
# packages, the test suites (huge and repetitive) and the generated codec tables.
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # "<pad>" = id 2 = EngramConfig's default pad_id
EOS_ID = 1


# --------------------------------------------------------------------------
# corpus and tokenizer
# --------------------------------------------------------------------------


def stdlib_files(root: Optional[str] = None, max_files: Optional[int] = None) -> List[str]:
    """Sorted .py files of the standard library (without tests and site-packages)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    out.sort()
    if not out:
        raise RuntimeError(f"no .py files found under the stdlib path {root!r}")
    if max_files is not None:
        # An evenly spaced subset keeps every package represented.
        step = max(1, len(out) // max_files)
        out = out[::step][:max_files]
    return out


def split_files(files: Sequence[str], val_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Held-out split by whole file, so no line of a held-out file is trained on."""
    files = list(files)
    random.Random(seed).shuffle(files)
    n_val = max(1, round(len(files) * val_fraction))
    if n_val >= len(files):
        raise ValueError(f"--val-fraction={val_fraction} leaves no training file out of {len(files)}")
    return sorted(files[n_val:]), sorted(files[:n_val])


def read_texts(files: Sequence[str]) -> List[str]:
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte level: every file round-trips, and code's runs of spaces become tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def build_compression(tok) -> Tuple[engram.CompressionTable, str]:
    """The tokenizer's canonical-id table (spec §1), and where it came from."""
    try:
        from engram.tokenizer import build_compression as build
    except ImportError:
        # Only while engram.tokenizer is not part of the checkout: hashing then
        # sees raw token ids, which still works but shares no rows between
        # "Name"/" name"-style variants.
        print("note: engram.tokenizer.build_compression is not available; using the identity compression")
        return engram.CompressionTable.identity(tok.get_vocab_size()), "identity (engram.tokenizer missing)"
    return build(tok), "engram.tokenizer.build_compression"


def encode_stream(tok, texts: Sequence[str]) -> torch.Tensor:
    """All files as one id stream, each file followed by </s>."""
    ids: List[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int64)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block; an Engram layer, if any, updates the residual
    stream before attention, as in the reference release."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.norm2 = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.engram: Optional[engram.EngramLayer] = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if self.engram is not None:
            x = x + self.engram(x, input_ids)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"--d-model={d_model} must be a multiple of --heads={n_heads}")
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_heads) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        # GPT-2 style init; residual output projections shrink with depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def add_engram(self, config: engram.EngramConfig, compression: engram.CompressionTable, init: str = "scaled",
                   table_placement: str = "device", table_dir: Optional[str] = None) -> None:
        """table_placement: see engram.EngramLayer; "mmap" keeps layer i's table in table_dir/engram_{i}.npy."""
        d_model = self.tok_emb.embedding_dim
        for layer_id in config.layer_ids:
            if not 0 <= layer_id < len(self.blocks):
                raise ValueError(f"Engram layer id {layer_id} is outside the {len(self.blocks)}-layer backbone")
            path = os.path.join(table_dir, f"engram_{layer_id}.npy") if table_dir is not None else None
            layer = engram.EngramLayer(config, layer_id, d_model, compression=compression,
                                       table_placement=table_placement, table_path=path)
            if init == "scaled":
                # The reference's N(0, 1) tables suit a residual stream of unit
                # scale; this backbone's is 0.02 (GPT-2 init). With unit-scale
                # rows every Adam step moves value_proj(e) by ~lr * sum|e|
                # (~0.3 per channel), the Engram update swamps the stream and
                # training stalls near the unigram loss. Rows at the token
                # embeddings' scale, and a zero conv so that branch starts
                # silent (its RMSNorm input makes it O(1) otherwise), fix it.
                nn.init.normal_(layer.multi_head_embedding.embedding.weight, std=0.02)
                nn.init.zeros_(layer.short_conv.conv.weight)
            elif init != "reference":
                raise ValueError(f"engram init={init!r}: expected 'scaled' or 'reference'")
            self.blocks[layer_id].engram = layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            x = block(x, input_ids)
        return self.head(self.norm(x))


def engram_tables(model: nn.Module) -> List[nn.Parameter]:
    return [m.multi_head_embedding.embedding.weight for m in model.modules() if isinstance(m, engram.EngramLayer)]


def count_params(model: nn.Module) -> Dict[str, int]:
    tables = {id(p) for p in engram_tables(model)}
    total = sum(p.numel() for p in model.parameters())
    table = sum(p.numel() for p in model.parameters() if id(p) in tables)
    return {"total": total, "engram_tables": table, "dense": total - table}


TABLE_OPTIMS = {"dense": None, "rowwise-sgd": "sgd", "rowwise-adagrad": "adagrad", "rowwise-adam": "adam"}


def make_optimizers(model: nn.Module, args) -> List[torch.optim.Optimizer]:
    """AdamW for the dense weights; the Engram tables get their own Adam with
    a higher rate and no weight decay (as the reference trains them): each row
    is touched by few tokens per step, so it needs bigger steps, and decay
    would shrink the rows that are rarely looked up.

    With --table-optim rowwise-*, the tables train row-wise instead
    (engram.optim.make_rowwise): the update is fused into the backward pass,
    touches only the rows the batch looked up, and no table gradient exists."""
    tables = engram_tables(model)
    table_ids = {id(p) for p in tables}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in table_ids:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    opts: List[torch.optim.Optimizer] = [
        torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
    ]
    rule = TABLE_OPTIMS[getattr(args, "table_optim", "dense")]
    if tables and rule is None:
        opts.append(torch.optim.Adam(tables, lr=args.lr * args.engram_lr_mult, betas=(0.9, 0.95)))
    elif tables:
        hyper = {"betas": (0.9, 0.95)} if rule == "adam" else {}
        # Its step() has nothing to do (the tables were updated in backward);
        # it stays in the list so that the lr schedule drives its rate.
        opts.append(engram.optim.make_rowwise(model, rule, lr=args.lr * args.engram_lr_mult, **hyper))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def table_optim_memory(model: nn.Module, opts: Sequence[torch.optim.Optimizer]) -> Dict[str, int]:
    """Bytes a row-wise table optimizer holds between steps, against the dense
    table Adam: its gradient (one table size, kept from backward to the next
    zero_grad) and its two moments (two table sizes)."""
    table_bytes = sum(p.numel() * p.element_size() for p in engram_tables(model))
    rowwise = [o for o in opts if isinstance(o, engram.optim.RowwiseOptimizer)]
    state = sum(engram.optim.state_bytes(o) for o in rowwise)
    dense = 3 * table_bytes
    return {"table_bytes": table_bytes, "dense_grad_and_adam_state_bytes": dense, "rowwise_state_bytes": state,
            "saved_bytes": dense - state}


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The cross entropy runs in float32 at least (bf16/fp16 logits upcast),
    in float64 with --dtype float64."""
    return torch.promote_types(logits.dtype, torch.float32)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def random_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """n fixed windows spread evenly over the held-out stream (so over many files)."""
    last = stream.numel() - seq_len - 1
    if last < 0:
        raise ValueError(f"the held-out split has {stream.numel()} tokens, fewer than --seq-len+1={seq_len + 1}")
    starts = torch.linspace(0, last, n).long().unique()
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch].to(device)
        logits = model(w[:, :-1])
        logits = logits.flatten(0, 1).to(loss_dtype(logits))
        total += F.cross_entropy(logits, w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------


def smooth(values: Sequence[float], alpha: float = 0.05) -> List[float]:
    """Bias-corrected exponential moving average, for readable train curves."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** (i + 1)))
    return out


def plot_losses(path: str, history: Dict[str, Dict[str, list]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:blue", "engram": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, h in history.items():
        steps = list(range(1, len(h["train"]) + 1))
        ax.plot(steps, smooth(h["train"]), color=colors[name], alpha=0.45, lw=1.2, label=f"{name} train (EMA)")
        vs, vl = zip(*h["val"])
        ax.plot(vs, vl, color=colors[name], marker="o", ms=4, lw=2, label=f"{name} held-out")
    final = [min(v for _, v in h["val"]) for h in history.values()]
    ax.set_ylim(min(final) - 0.3, min(max(final) + 2.5, max(max(h["train"]) for h in history.values())))
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def token_label(piece: str) -> str:
    """A token's text made visible: newline as ↵, spaces as ·, long indents as ·×N."""
    label = re.sub(r" {4,}", lambda m: f"·×{len(m.group())}", piece)
    return label.replace("\n", "↵").replace("\t", "→").replace(" ", "·") or "∅"


def token_kind(prev: str, piece: str) -> str:
    """Coarse class of a token for the gate statistics."""
    if not piece.strip():
        return "whitespace"
    word = lambda c: c.isalnum() or c == "_"  # noqa: E731
    if word(piece[0]) and prev and word(prev[-1]):
        return "inside a name"  # continues a multi-token identifier, e.g. "_open|hook"
    if word(piece.lstrip()[0]):
        return "starts a name"
    return "punctuation"


@torch.no_grad()
def gate_statistics(model: nn.Module, tok, windows: torch.Tensor, device: torch.device) -> Dict[str, Dict[str, float]]:
    """Mean gate per token class and Engram layer over held-out windows."""
    sums: Dict[str, Dict[str, List[float]]] = {}
    model.eval()
    for w in windows:
        ids = w[None, :-1].to(device)
        with record_gates(model) as gates:
            model(ids)
        pieces = [tok.decode([i]) for i in ids[0].tolist()]
        kinds = [token_kind(a, b) for a, b in zip([""] + pieces[:-1], pieces)]
        for layer_id, g in gates.items():
            g = g[0].mean(-1).float().cpu().tolist()  # mean over branches
            per = sums.setdefault(f"layer {layer_id}", {})
            for kind, value in zip(kinds, g):
                per.setdefault(kind, []).append(value)
    model.train()
    return {
        layer: {kind: round(sum(v) / len(v), 4) for kind, v in sorted(per.items())} for layer, per in sorted(sums.items())
    }


def plot_gates(path: str, pieces: Sequence[str], gates: Dict[int, torch.Tensor], title: str, per_row: int = 48) -> None:
    """Heat map: tokens along x, one row per Engram layer (and branch), wrapped
    into strips of `per_row` tokens so the labels stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    rows, names = [], []
    for layer_id, g in gates.items():  # g [T, G]
        for branch in range(g.shape[1]):
            rows.append(g[:, branch])
            names.append(f"layer {layer_id}" + (f" / branch {branch}" if g.shape[1] > 1 else ""))
    grid = torch.stack(rows).numpy()  # [R, T]
    labels = [token_label(p) for p in pieces]
    n_strips = math.ceil(len(labels) / per_row)
    fig, axes = plt.subplots(
        n_strips, 1, figsize=(0.26 * per_row + 3, (0.5 * len(rows) + 1.6) * n_strips + 0.6), squeeze=False,
        layout="constrained",
    )
    image = None
    for s in range(n_strips):
        ax = axes[s, 0]
        lo, hi = s * per_row, min((s + 1) * per_row, len(labels))
        # Gates sit mostly near 1; a power norm spreads the open end so its
        # variation shows, while the colour bar keeps the true 0..1 values.
        image = ax.imshow(grid[:, lo:hi], aspect="auto", cmap="viridis", norm=PowerNorm(2.0, vmin=0.0, vmax=1.0),
                          interpolation="nearest")
        ax.set_xticks(range(hi - lo))
        ax.set_xticklabels(labels[lo:hi], rotation=90, fontsize=8, fontfamily="monospace")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=9)
        ax.set_xlim(-0.5, per_row - 0.5)
        if s == n_strips - 1:
            ax.set_xlabel("held-out tokens, in order (· = space, ↵ = newline)")
    fig.suptitle(title)
    bar = fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01,
                       label="gate value (0 = closed, 1 = open; colours stretched near 1)")
    bar.set_ticks([0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick_snippet(tok, val_texts: Sequence[str], n_tokens: int) -> List[int]:
    """Token ids of a held-out snippet that starts at a line and contains common
    multi-token phrases, so the gate map has fixed phrases to show."""
    phrases = ("raise ValueError(", "isinstance(", "os.path.", "self.", "return ")
    best, best_score = None, -1
    for text in val_texts:
        lines = text.splitlines(keepends=True)
        for i in range(0, max(1, len(lines) - 8), 4):
            chunk = "".join(lines[i : i + 12])
            body = chunk.lstrip("\n")
            # Skip comment and docstring blocks: they are prose, not code.
            if not body or body.lstrip().startswith(("#", '"""', "'''")):
                continue
            score = sum(chunk.count(p) for p in phrases)
            if score > best_score:
                best, best_score = chunk, score
    ids = tok.encode(best or val_texts[0]).ids
    return ids[:n_tokens]


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the PNGs and metrics.json")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--engram-layers", default="1,3", help="comma-separated zero-based block ids")
    p.add_argument("--engram-vocab-size", type=int, default=20011, help="minimum rows per hash head")
    p.add_argument("--engram-dim", type=int, default=64, help="n_embed_per_ngram (E)")
    p.add_argument("--engram-heads", type=int, default=4, help="n_head_per_ngram (H)")
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--engram-init", choices=("scaled", "reference"), default="scaled",
                   help="scaled: table rows at the token embeddings' scale (std 0.02) and a zero short conv; "
                   "reference: the layer's own init (N(0, 1) rows)")
    p.add_argument("--engram-lr-mult", type=float, default=5.0, help="table learning rate / --lr")
    p.add_argument("--table-optim", choices=tuple(TABLE_OPTIMS), default="dense",
                   help="dense: Adam on the dense table gradient; rowwise-*: engram.optim's row-wise sparse "
                   "optimizer, fused into the backward pass (no table gradient; SGD, row-wise Adagrad or Adam)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seq-len tokens")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of files held out")
    p.add_argument("--max-files", type=int, default=None, help="use an evenly spaced subset of the stdlib files")
    p.add_argument("--snippet-tokens", type=int, default=96, help="tokens in the gate heat map")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="parameter dtype (float64: for checking the sharded run against one process)")
    p.add_argument("--shard-tables", action="store_true",
                   help="run under torchrun: row-shard the Engram tables over the ranks, DDP for the dense "
                   "weights, each rank training on its slice of --batch-size (needs --table-optim rowwise-*)")
    args = p.parse_args(argv)
    positive = ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "vocab_size", "eval_every",
                "eval_windows", "engram_vocab_size", "engram_dim", "engram_heads", "snippet_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.lr <= 0 or args.engram_lr_mult <= 0:
        p.error("--lr and --engram-lr-mult must be > 0")
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        p.error(f"--vocab-size must be >= {256 + len(SPECIAL_TOKENS)} (the byte alphabet plus special tokens)")
    try:
        args.engram_layer_ids = [int(x) for x in args.engram_layers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--engram-layers={args.engram_layers!r}: expected comma-separated ints such as 1,3")
    bad = [i for i in args.engram_layer_ids if not 0 <= i < args.layers]
    if not args.engram_layer_ids or bad:
        p.error(f"--engram-layers={args.engram_layers!r}: expected ids in 0..{args.layers - 1}")
    if args.shard_tables and args.table_optim == "dense":
        p.error("--shard-tables needs --table-optim rowwise-sgd, rowwise-adagrad or rowwise-adam: a sharded "
                "table trains row-wise (dense Adam would need the whole table's gradient)")
    return args


def setup_distributed(args) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. With --shard-tables, joins
    the process group torchrun describes (gloo on CPU, NCCL on CUDA)."""
    if not args.shard_tables:
        return 0, 1, torch.device(args.device)
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--shard-tables: RANK/WORLD_SIZE are not set; launch with torchrun, e.g. "
                         "torchrun --nproc-per-node 2 examples/train_tiny_lm.py --shard-tables ...")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size={args.batch_size} must be a multiple of the world size {world} "
                         "(each rank trains on an equal slice of the global batch)")
    return rank, world, device


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args)
    dtype = getattr(torch, args.dtype)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # ---- corpus, tokenizer, compression ---------------------------------
    files = stdlib_files(max_files=args.max_files)
    train_files, val_files = split_files(files, args.val_fraction, args.seed)
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    tok = train_tokenizer(train_texts, args.vocab_size)  # held-out files stay unseen here too
    compression, compression_source = build_compression(tok)
    train_stream, val_stream = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    t_data = time.time() - t_start
    log(
        f"corpus: {len(train_files)} train / {len(val_files)} held-out files, "
        f"{train_stream.numel():,} / {val_stream.numel():,} tokens; vocab {tok.get_vocab_size()}, "
        f"{compression} ({t_data:.0f}s)"
    )

    # ---- the two models: same backbone init, Engram added on one -------
    vocab = tok.get_vocab_size()
    ecfg = engram.EngramConfig(
        engram_vocab_size=[args.engram_vocab_size] * (args.max_ngram - 1),
        max_ngram_size=args.max_ngram,
        n_embed_per_ngram=args.engram_dim,
        n_head_per_ngram=args.engram_heads,
        layer_ids=args.engram_layer_ids,
        pad_id=SPECIAL_TOKENS.index("<pad>"),
        seed=args.seed,
    )
    models: Dict[str, TinyLM] = {}
    for name in ("baseline", "engram"):
        torch.manual_seed(args.seed)
        m = TinyLM(vocab, args.d_model, args.layers, args.heads, args.seq_len)
        if name == "engram":
            torch.manual_seed(args.seed + 1)
            m.add_engram(ecfg, compression, init=args.engram_init)
        models[name] = m.to(device=device, dtype=dtype).train()
    params = {name: count_params(m) for name, m in models.items()}
    if args.shard_tables:
        from engram import distributed as edist

        # Every rank built the same model from the same seed: each keeps its rows.
        edist.shard_tables(models["engram"])
    for name, p in params.items():
        log(f"{name}: {p['total']:,} params ({p['dense']:,} dense + {p['engram_tables']:,} in Engram tables)")
    optims = {name: make_optimizers(m, args) for name, m in models.items()}
    table_memory = None
    if args.table_optim != "dense":
        table_memory = table_optim_memory(models["engram"], optims["engram"])
        mib = {k: v / 2**20 for k, v in table_memory.items()}
        log(
            f"table optimizer: {args.table_optim}, fused into backward (tables have no .grad; gradient clipping "
            f"covers the dense weights only). Held between steps: {mib['rowwise_state_bytes']:.1f} MiB of "
            f"optimizer state, against {mib['dense_grad_and_adam_state_bytes']:.1f} MiB for the dense table "
            f"gradient + Adam moments; saves {mib['saved_bytes']:.1f} MiB "
            f"({mib['table_bytes']:.1f} MiB of tables)"
        )

    # What trains: the models themselves, or DDP wrappers with the sharded
    # tables left out (their gradients travel in engram.distributed's exchange).
    runners: Dict[str, nn.Module] = dict(models)
    if args.shard_tables:
        from torch.nn.parallel import DistributedDataParallel as DDP

        edist.ddp_ignore_tables(models["engram"])
        ids = None if device.type == "cpu" else [device.index]
        runners = {name: DDP(m, device_ids=ids) for name, m in models.items()}
        table_shards = [
            [t.row_start, t.row_stop] for t in edist.sharded_tables(models["engram"])]
        log(f"sharded tables over {world} ranks; rank 0 holds rows {table_shards}; "
            f"{args.batch_size // world} of {args.batch_size} sequences per rank and step")

    # ---- training: identical batches, one step of each model per batch --
    gen = torch.Generator().manual_seed(args.seed)
    windows = eval_windows(val_stream, args.eval_windows, args.seq_len)
    history = {name: {"train": [], "val": []} for name in models}
    seconds = {name: 0.0 for name in models}
    warmup = min(args.warmup, max(1, args.steps // 10))
    bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True, disable=not is_main)
    local = args.batch_size // world
    for step in bar:
        batch = random_batch(train_stream, args.batch_size, args.seq_len, gen)  # the global batch, on every rank
        batch = batch[rank * local : (rank + 1) * local].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        factor = lr_factor(step, args.steps, warmup)
        for name, model in runners.items():
            t0 = time.time()
            for opt in optims[name]:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype(logits)), y.flatten())
            for opt in optims[name]:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optims[name]:
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] += time.time() - t0
            if world > 1:  # the global batch's loss: the mean of the ranks' equal-sized slices
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
                loss /= world
            history[name]["train"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for name, model in models.items():
                history[name]["val"].append((step + 1, evaluate(model, windows, args.batch_size, device)))
        bar.set_postfix(
            {f"{n[:4]}": f"{h['train'][-1]:.3f}" + (f"/{h['val'][-1][1]:.3f}" if h["val"] else "") for n, h in history.items()}
        )
    bar.close()

    # ---- gates over a held-out snippet ---------------------------------
    snippet = pick_snippet(tok, val_texts, min(args.snippet_tokens, args.seq_len))
    ids = torch.tensor([snippet], device=device)
    models["engram"].eval()
    with torch.no_grad(), record_gates(models["engram"]) as gates:
        models["engram"](ids)
    gate_maps = {l: g[0].float().cpu() for l, g in sorted(gates.items())}  # {layer: [T, G]}
    pieces = [tok.decode([i]) for i in snippet]
    gate_stats = gate_statistics(models["engram"], tok, windows[: max(1, min(16, windows.shape[0]))], device)

    # ---- outputs ----------------------------------------------------------
    base_val, eng_val = history["baseline"]["val"][-1][1], history["engram"]["val"][-1][1]
    tokens_per_step = args.batch_size * args.seq_len
    metrics = {
        "baseline_val_loss": base_val,
        "engram_val_loss": eng_val,
        "val_loss_delta": eng_val - base_val,
        "baseline_val_ppl": math.exp(base_val),
        "engram_val_ppl": math.exp(eng_val),
        "baseline_params": params["baseline"]["total"],
        "engram_params": params["engram"]["total"],
        "engram_dense_params": params["engram"]["dense"],
        "engram_table_params": params["engram"]["engram_tables"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step,
        "train_tokens_seen": tokens_per_step * args.steps,
        "train_corpus_tokens": train_stream.numel(),
        "val_corpus_tokens": val_stream.numel(),
        "val_eval_tokens": int(windows.shape[0] * args.seq_len),
        "train_files": len(train_files),
        "val_files": len(val_files),
        "vocab_size": vocab,
        "compressed_vocab_size": compression.num_canonical,
        "compression": compression_source,
        "train_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "data_seconds": round(t_data, 2),
        "wall_seconds": round(time.time() - t_start, 2),
        "device": str(device),
        "dtype": args.dtype,
        "world_size": world,
        "shard_tables": args.shard_tables,
        "train_losses": {k: h["train"] for k, h in history.items()},
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "engram": engram.__version__,
        "engram_config": {k: getattr(ecfg, k) for k in ecfg.__dataclass_fields__},
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "max_len": args.seq_len},
        "engram_init": args.engram_init,
        "optim": {"lr": args.lr, "engram_table_lr": args.lr * args.engram_lr_mult, "weight_decay": args.weight_decay,
                  "warmup": warmup, "schedule": "linear warm-up, cosine to 10%", "grad_clip": 1.0},
        "seed": args.seed,
        **({"table_optim": args.table_optim, "table_optim_memory": table_memory} if table_memory else {}),
        "val_curves": {k: h["val"] for k, h in history.items()},
        "mean_gate_by_token_kind": gate_stats,
        "gate_snippet": {"tokens": pieces, "gates": {str(l): g.tolist() for l, g in gate_maps.items()}},
    }
    if args.shard_tables:
        # Every collective is behind us (the last were the gate passes); rank 0 writes.
        torch.distributed.destroy_process_group()
    if not is_main:
        return metrics
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    title = (
        f"Tiny LM on Python stdlib source: {args.layers} layers, d={args.d_model}, {args.steps} steps x "
        f"{tokens_per_step:,} tokens\nheld-out loss: baseline {base_val:.3f}, Engram {eng_val:.3f} "
        f"(params {params['baseline']['total'] / 1e6:.1f}M vs {params['engram']['total'] / 1e6:.1f}M incl. tables)"
    )
    plot_losses(os.path.join(args.out, "loss_curves.png"), history, title)
    plot_gates(
        os.path.join(args.out, "gate_heatmap.png"),
        pieces,
        gate_maps,
        "Engram gate per token on a held-out snippet (bright = the looked-up n-gram memory is let in)",
    )
    metrics["wall_seconds"] = round(time.time() - t_start, 2)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)

    print(
        f"\nheld-out loss after {args.steps} steps: baseline {base_val:.4f}, engram {eng_val:.4f} "
        f"(delta {eng_val - base_val:+.4f})\n"
        f"params: baseline {params['baseline']['total']:,}; engram {params['engram']['total']:,} "
        f"= {params['engram']['dense']:,} dense + {params['engram']['engram_tables']:,} table\n"
        f"train time: baseline {seconds['baseline']:.0f}s, engram {seconds['engram']:.0f}s; "
        f"wall {metrics['wall_seconds']:.0f}s; outputs in {args.out}"
    )
    for layer, stats in gate_stats.items():
        print(f"mean gate, {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    return metrics


if __name__ == "__main__":
    main()
