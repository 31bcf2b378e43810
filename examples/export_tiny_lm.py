"""Export the tiny LM of train_tiny_lm.py with torch.export and AOTInductor.

Builds the Engram model of the training example (the same classes and
builders; random weights, or a state_dict saved from it with --checkpoint),
exports it in inference with a dynamic batch and sequence length, compiles an
AOTInductor package (.pt2) in which the Engram tables are runtime inputs, not
constants, then greedily decodes with the package and with eager PyTorch and
compares the tokens. CPU only; nothing is downloaded.

    python examples/export_tiny_lm.py --out runs/export                 # ~1-2 min on 2 CPU cores
    python examples/export_tiny_lm.py --out runs/export --placement mmap

Writes to --out: tiny_lm.pt2 (the package), export_metrics.json (times,
sizes, the prompt and the eager tokens) and tables.json, the manifest of the
tables the package takes as .npy files (under --out/tables; with --placement
mmap, the model's own table files), which the C++ runner examples/cpp/generate
reads without Python:

    examples/cpp/build/generate runs/export/tiny_lm.pt2 runs/export/tables.json "5,9,2;7,1,3" 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import engram
import engram.export as ex

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_lm import SPECIAL_TOKENS, TinyLM  # noqa: E402  (the model of the training example)


def build_model(args) -> TinyLM:
    """The Engram model of train_tiny_lm.py with these dimensions, in eval mode."""
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab_size, args.d_model, args.layers, args.heads, args.max_len)
    config = engram.EngramConfig(
        engram_vocab_size=[args.engram_vocab_size] * (args.max_ngram - 1),
        max_ngram_size=args.max_ngram,
        n_embed_per_ngram=args.engram_dim,
        n_head_per_ngram=args.engram_heads,
        layer_ids=args.engram_layer_ids,
        pad_id=SPECIAL_TOKENS.index("<pad>"),
        seed=args.seed,
    )
    torch.manual_seed(args.seed + 1)
    table_dir = None
    if args.placement == "mmap":
        table_dir = os.path.join(args.out, "tables")
        os.makedirs(table_dir, exist_ok=True)
    # The identity compression: a checkpoint does not hold the tokenizer's
    # (hash_lookup is a non-persistent buffer), and export does not depend on it.
    model.add_engram(config, engram.CompressionTable.identity(args.vocab_size), init=args.engram_init,
                     table_placement=args.placement, table_dir=table_dir)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def write_tables(model, out: str) -> str:
    """tables.json in out: [{"name", "path"}] of model's tables, in the order
    the package takes them, each an .npy file (path relative to out) that a
    C++ program maps without Python. An mmap table is its own file; the others
    are written to out/tables/<name>.npy. Returns the manifest's path."""
    entries = []
    for name, (_, m), t in zip(ex.table_names(model), ex._table_modules(model), ex.table_tensors(model)):
        if m.placement == "mmap":
            m.flush()  # the file is what the C++ runner reads
            path = m.table_path
        else:
            if t.dtype not in (torch.float16, torch.float32, torch.float64):
                raise ValueError(f"table {name!r} is {t.dtype}; .npy holds float16, float32 or float64 tables")
            path = os.path.join(out, "tables", f"{name}.npy")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, t.cpu().numpy())
        entries.append({"name": name, "path": os.path.relpath(path, out)})
    manifest = os.path.join(out, "tables.json")
    with open(manifest, "w") as f:
        json.dump({"tables": entries}, f, indent=1)
    return manifest


def median_seconds(fn, x, repeats: int) -> float:
    """Median wall time of fn(x) over repeats calls, after one warm-up call."""
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the package and export_metrics.json")
    p.add_argument("--checkpoint", default=None, help="a state_dict of the Engram TinyLM (torch.save) to load")
    p.add_argument("--placement", choices=engram.layer.TABLE_PLACEMENTS, default="device",
                   help="where the Engram tables live (mmap: files under --out/tables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engram-init", choices=("scaled", "reference"), default="scaled",
                   help="TinyLM.add_engram's init; untrained, 'reference' (N(0, 1) rows) makes the Engram branch "
                        "steer decoding, so the tokens depend on the table lookups")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--time-only", action="store_true",
                   help="no export: time one forward pass of --out's package and of eager on its decoded ids")
    # The defaults of train_tiny_lm.py.
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128, help="position embeddings (train_tiny_lm's --seq-len)")
    p.add_argument("--engram-layers", default="1,3")
    p.add_argument("--engram-vocab-size", type=int, default=20011)
    p.add_argument("--engram-dim", type=int, default=64)
    p.add_argument("--engram-heads", type=int, default=4)
    p.add_argument("--max-ngram", type=int, default=3)
    # Export and decoding.
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the package accepts")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-batch", type=int, default=2)
    p.add_argument("--timing-repeats", type=int, default=20,
                   help="forward passes (of the decoded ids) whose median time is reported")
    args = p.parse_args(argv)
    try:
        args.engram_layer_ids = [int(x) for x in args.engram_layers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--engram-layers={args.engram_layers!r}: expected comma-separated ints such as 1,3")
    if args.prompt_len + args.new_tokens > args.max_len:
        p.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds --max-len={args.max_len}")
    if not 1 <= args.decode_batch <= args.max_batch:
        p.error(f"--decode-batch={args.decode_batch}: expected 1..--max-batch={args.max_batch}")
    return args


def export_package(model, example: torch.Tensor, max_batch: int, max_seq: int, path: str) -> dict:
    """torch.export then AOTInductor package of model at path; returns times and sizes."""
    tables = ex.table_tensors(model)
    table_bytes = ex.table_bytes(tables)
    print("torch.export (dynamic batch and sequence length) ...", flush=True)
    ep, export_s = ex.timed(ex.export, model, example, max_batch=max_batch, max_seq=max_seq)
    print(f"  {export_s:.1f}s")
    print("AOTInductor compile and package (the slow step) ...", flush=True)
    path, compile_s = ex.timed(ex.compile_package, ep, path, model)
    package_bytes = os.path.getsize(path)
    print(f"  {compile_s:.1f}s; {path}: {package_bytes / 2**20:.2f} MiB, tables {table_bytes / 2**20:.1f} MiB "
          f"(package / tables = {package_bytes / table_bytes:.3f})")
    return {"path": path, "export_seconds": round(export_s, 2), "compile_seconds": round(compile_s, 2),
            "package_bytes": package_bytes, "table_bytes": table_bytes}


@torch.no_grad()
def time_forward(model, package, ids: torch.Tensor, repeats: int):
    """(eager, package) median seconds of one forward pass of ids, timed like
    the C++ runner times it."""
    tables = ex.table_tensors(model)
    return median_seconds(model, ids, repeats), median_seconds(lambda x: package(x, tables), ids, repeats)


def time_only(model, out: str, package_name: str, repeats: int) -> dict:
    """--time-only: the forward times of out's package (already exported) and
    of model on out's decoded ids, printed as JSON; a fresh process next to a
    C++ run times both under the same machine load."""
    with open(os.path.join(out, "export_metrics.json")) as f:
        ids = torch.tensor(json.load(f)["eager_tokens"])
    eager_s, package_s = time_forward(model, ex.load_package(os.path.join(out, package_name)), ids, repeats)
    times = {"shape": list(ids.shape), "threads": torch.get_num_threads(), "repeats": repeats,
             "eager_ms": eager_s * 1e3, "package_ms": package_s * 1e3}
    print(json.dumps(times))
    return times


def compare_decoding(model, path: str, prompt: torch.Tensor, new_tokens: int, timing_repeats: int) -> dict:
    """Greedy decoding with model (eager: model(ids) -> logits) and with the
    package at path, and the median time of one forward pass of the decoded
    ids with each; the metrics the C++ runner is checked against."""
    from tqdm.auto import tqdm

    tables = ex.table_tensors(model)
    package = ex.load_package(path)
    with torch.no_grad():
        # The logits of one forward pass, and greedy decoding step by step.
        eager_logits = model(prompt)
        package_logits = package(prompt, tables)
        max_diff = (eager_logits - package_logits).abs().max().item()
        ids = {"eager": prompt, "package": prompt}
        steps = {"eager": model, "package": lambda x: package(x, tables)}
        # The smallest gap between the two largest eager logits of a step: how
        # far the package's (or a C++ runner's) rounding is from flipping a token.
        min_gap = float("inf")
        for _ in tqdm(range(new_tokens), desc="greedy decoding (eager and package)", unit="token"):
            for name, step in steps.items():
                logits = step(ids[name])
                if name == "eager":
                    top2 = logits[:, -1].topk(2, dim=-1).values
                    min_gap = min(min_gap, (top2[:, 0] - top2[:, 1]).min().item())
                ids[name] = torch.cat([ids[name], logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        eager_s, package_s = time_forward(model, package, ids["eager"], timing_repeats)
    same = torch.equal(ids["eager"], ids["package"])
    print(f"one forward pass: logits bit-identical {torch.equal(eager_logits, package_logits)}, max |diff| {max_diff:.3g} "
          f"(max |logit| {eager_logits.abs().max().item():.3g})")
    print(f"greedy decoding, {prompt.shape[0]} x {new_tokens} tokens: package tokens == eager tokens: {same} "
          f"(smallest top-1 - top-2 eager logit gap {min_gap:.3g})")
    print(f"one forward pass of {list(ids['eager'].shape)} ids (median of {timing_repeats}, "
          f"{torch.get_num_threads()} threads): eager {eager_s * 1e3:.2f} ms, package {package_s * 1e3:.2f} ms")
    return {
        "logits_bit_identical": torch.equal(eager_logits, package_logits), "logits_max_abs_diff": max_diff,
        "tokens_equal": same, "min_top2_logit_gap": min_gap, "tokens": ids["package"].tolist(),
        "prompt": prompt.tolist(), "eager_tokens": ids["eager"].tolist(), "new_tokens": new_tokens,
        "forward_shape": list(ids["eager"].shape), "timing_repeats": timing_repeats,
        "eager_forward_seconds": eager_s, "package_forward_seconds": package_s,
        "torch": torch.__version__, "engram": engram.__version__, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_metrics(out: str, metrics: dict) -> None:
    with open(os.path.join(out, "export_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    if not metrics["tokens_equal"]:
        sys.exit("package and eager decoded different tokens")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    os.makedirs(args.out, exist_ok=True)
    model = build_model(args)
    if args.time_only:
        return time_only(model, args.out, "tiny_lm.pt2", args.timing_repeats)
    tables = ex.table_tensors(model)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} params, {len(tables)} Engram tables of "
          f"{ex.table_bytes(tables) / 2**20:.1f} MiB ({args.placement} placement)")
    example = torch.randint(0, args.vocab_size, (2, args.prompt_len))
    metrics = export_package(model, example, args.max_batch, args.max_len, os.path.join(args.out, "tiny_lm.pt2"))
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab_size, (args.decode_batch, args.prompt_len), generator=gen)
    metrics.update(compare_decoding(model, metrics["path"], prompt, args.new_tokens, args.timing_repeats))
    print(f"tables for the C++ runner: {write_tables(model, args.out)}")
    metrics["placement"] = args.placement
    metrics["args"] = {k: v for k, v in vars(args).items() if k != "engram_layer_ids"}
    write_metrics(args.out, metrics)
    return metrics


if __name__ == "__main__":
    main()
