"""EngramLayer on CPU: forward and forward+backward time against two peers,
same inputs and weights, one run.

  ours  engram.EngramLayer: fused hash, embedding, one projection GEMM, fused
        context gate and gated short conv.
  (a)   engram.reference.EngramLayerReference(hashing="op"): the plain-PyTorch
        composite users write (nn.Embedding with a dense gradient, nn.Linear,
        nn.RMSNorm, nn.Conv1d), hashing with the fused op.
  (b)   engram.reference.EngramLayerReference(hashing="numpy"): the reference
        release's formulation, numpy hashing on every call + the same modules.
  floor the layer's projection GEMMs alone, at the same shapes and dtype: the
        forward's one [B*T, (N-1)*E] x [(N-1)*E, (G+1)*D] addmm, and for
        forward+backward also the backward's grad-input (dY W) and
        grad-weight (dY^T E) GEMMs, into preallocated outputs. Everything
        the layer spends above it is not GEMM (hash, gather, norms, gate,
        conv, their backward, the table gradient, allocation and copies).

forward runs under torch.no_grad(); forward+backward computes the gradients of
the hidden states and of every parameter (the dense table gradient included)
with torch.autograd.grad, so nothing accumulates between runs. Times are the
median (and best) block of torch.utils.benchmark.Timer.blocked_autorange,
pooled over interleaved rounds; on a shared machine, load from elsewhere
shows up as a spread between the two, mostly in the peers' many small ops.

Peak memory is the growth of the resident set during one forward+backward
call, measured in a fresh subprocess per layer: Linux's peak RSS (VmHWM) is
reset through /proc/self/clear_refs before the call and read after it, minus
the RSS before. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that
glibc returns every freed block of 64 KiB or more to the OS and the RSS follows
the live allocations (otherwise a reused heap hides them). It counts what the
call allocates (activations, gradients, temporaries), not the weights and
inputs that exist before it. Where the reset is not permitted it says n/a.

    python benchmarks/bench_layer.py [--batch 2] [--seq 1024] [--hidden 512] [--hc-mult 4]
                                     [--rows 100000] [--min-run-time 3] [--rounds 3] [--threads N] [--profile]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys

import torch
from torch.utils.benchmark import Timer

import engram
from engram import EngramConfig, EngramLayer
from engram.reference import EngramLayerReference

VOCAB = 129280  # DeepSeek-V3 tokenizer, identity compression


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth_mib(fn):
    """Runs fn once; returns (peak RSS during it - RSS before) in MiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def peak_in_subprocess(peer: str):
    """Peak RSS growth of one forward+backward of `peer`, in a fresh process."""
    argv = [a for a in sys.argv[1:] if a != "--profile"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--peak-of", peer], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {peer} failed:\n{done.stderr}")
    value = done.stdout.strip().splitlines()[-1]
    return None if value == "n/a" else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--hc-mult", type=int, default=4)
    parser.add_argument("--rows", type=int, default=100_000, help="minimum rows per head (engram_vocab_size)")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds per measurement, all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the layers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("--peak-of", choices=["ours", "a", "b"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = EngramConfig(engram_vocab_size=[args.rows, args.rows])  # reference N=3, H=8, E=512, layers [1, 15]
    layer_id = cfg.layer_ids[0]
    ours = EngramLayer(cfg, layer_id, args.hidden, hc_mult=args.hc_mult)
    peer_a = EngramLayerReference(cfg, layer_id, args.hidden, hc_mult=args.hc_mult, hashing="op")
    peer_b = EngramLayerReference(cfg, layer_id, args.hidden, hc_mult=args.hc_mult, hashing="numpy")
    for peer in (peer_a, peer_b):
        peer.load_state_dict(ours.state_dict(), strict=True)
    hidden = torch.randn(args.batch, args.seq, args.hc_mult, args.hidden)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq))

    def forward(layer):
        def run():
            with torch.no_grad():
                return layer(hidden, ids)

        return run

    def forward_backward(layer):
        params = list(layer.parameters())

        def run():
            h = hidden.detach().requires_grad_()
            out = layer(h, ids)
            return torch.autograd.grad(out, [h, *params], torch.ones_like(out))

        return run

    # The GEMM floor: what ours multiplies in one forward (+ backward), alone.
    weight, bias = (p.detach().clone() for p in ours.fused_projection_weights())
    emb = torch.randn(args.batch * args.seq, weight.shape[1], dtype=weight.dtype)
    grad_out = torch.randn(args.batch * args.seq, weight.shape[0], dtype=weight.dtype)
    out, grad_emb, grad_weight = torch.empty_like(grad_out), torch.empty_like(emb), torch.empty_like(weight)

    def floor_forward():
        torch.addmm(bias, emb, weight.t(), out=out)

    def floor_forward_backward():
        torch.addmm(bias, emb, weight.t(), out=out)
        torch.mm(grad_out, weight, out=grad_emb)  # grad of the gathered embeddings
        torch.mm(grad_out.t(), emb, out=grad_weight)  # grad of the fused projection weight

    peers = {"ours": ("ours  EngramLayer", ours), "a": ("(a)   plain PyTorch + fused hash", peer_a),
             "b": ("(b)   reference: numpy hash + torch", peer_b)}
    floor_name = "floor projection GEMMs alone"
    if args.peak_of:
        mem = peak_rss_growth_mib(forward_backward(peers[args.peak_of][1]))
        print("n/a" if mem is None else f"{mem:.1f}")
        return

    # Same outputs before timing (float32 rounding only).
    torch.testing.assert_close(forward(ours)(), forward(peer_b)(), atol=1e-4, rtol=1e-4)

    table = ours.multi_head_embedding.embedding.weight
    print(
        f"EngramLayer CPU benchmark: B={args.batch} T={args.seq} D={args.hidden} G={args.hc_mult} "
        f"N={cfg.max_ngram_size} H={cfg.n_head_per_ngram} E={cfg.n_embed_per_ngram}, table {table.shape[0]:,} x "
        f"{table.shape[1]} ({table.numel() * table.element_size() / 2**20:.0f} MiB), float32"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"engram CPU ISA level {engram.cpu_isa()} (ENGRAM_CPU_ISA)")

    # Rounds interleave the layers, so that a burst of load from elsewhere on a
    # shared machine hits all of them rather than one; every timed block of
    # every round is pooled, and the median (and the best) block is printed.
    def blocks(fn):
        timer = Timer("f()", globals={"f": fn}, num_threads=args.threads)  # Timer's default is 1 thread
        return timer.blocked_autorange(min_run_time=args.min_run_time / args.rounds).times

    times = {key: {"fwd": [], "fwd_bwd": []} for key in [*peers, "floor"]}
    for _ in range(args.rounds):
        for key, (_, layer) in peers.items():
            times[key]["fwd"] += blocks(forward(layer))
            times[key]["fwd_bwd"] += blocks(forward_backward(layer))
        times["floor"]["fwd"] += blocks(floor_forward)
        times["floor"]["fwd_bwd"] += blocks(floor_forward_backward)
    median = {key: {k: statistics.median(v) for k, v in t.items()} for key, t in times.items()}
    best = {key: {k: min(v) for k, v in t.items()} for key, t in times.items()}
    memory = {key: peak_in_subprocess(key) for key in peers}

    width = max(len(floor_name), *(len(name) for name, _ in peers.values()))
    print(f"  median (best) of {args.rounds} interleaved rounds")
    print(f"  {'':<{width}}  {'forward':>18}  {'fwd+bwd':>18}  {'peak RSS growth, fwd+bwd':>25}")
    for key, (name, _) in peers.items():
        mem = memory[key]
        mem_text = "n/a" if mem is None else f"{mem:.0f} MiB"
        cols = [f"{median[key][k] * 1e3:7.1f} ({best[key][k] * 1e3:6.1f}) ms" for k in ("fwd", "fwd_bwd")]
        print(f"  {name:<{width}}  {cols[0]:>18}  {cols[1]:>18}  {mem_text:>25}")
    cols = [f"{median['floor'][k] * 1e3:7.1f} ({best['floor'][k] * 1e3:6.1f}) ms" for k in ("fwd", "fwd_bwd")]
    print(f"  {floor_name:<{width}}  {cols[0]:>18}  {cols[1]:>18}  {'':>25}")
    for key in ("a", "b"):
        ratio = {k: median[key][k] / median["ours"][k] for k in ("fwd", "fwd_bwd")}
        ratio_best = {k: best[key][k] / best["ours"][k] for k in ("fwd", "fwd_bwd")}
        print(f"  speed-up vs ({key}): forward {ratio['fwd']:.2f}x ({ratio_best['fwd']:.2f}x best), "
              f"forward+backward {ratio['fwd_bwd']:.2f}x ({ratio_best['fwd_bwd']:.2f}x best)")
    to_floor = {k: median["ours"][k] / median["floor"][k] for k in ("fwd", "fwd_bwd")}
    to_floor_best = {k: best["ours"][k] / best["floor"][k] for k in ("fwd", "fwd_bwd")}
    print(f"  ours / GEMM floor: forward {to_floor['fwd']:.2f}x ({to_floor_best['fwd']:.2f}x best), "
          f"forward+backward {to_floor['fwd_bwd']:.2f}x ({to_floor_best['fwd_bwd']:.2f}x best)")
    # Target (issue 22): forward+backward >= 3x the reference formulation (b),
    # or, where even a layer that were nothing but its GEMMs could not reach
    # 3x (the floor allows less), within 1.25x of the GEMM floor.
    allowed = median["b"]["fwd_bwd"] / median["floor"]["fwd_bwd"]
    if allowed >= 3.0:
        got = median["b"]["fwd_bwd"] / median["ours"]["fwd_bwd"]
        verdict = "met" if got >= 3.0 else "NOT met"
        print(f"  target: the floor allows {allowed:.2f}x over (b), so >= 3x vs (b) applies: {got:.2f}x, {verdict}")
    else:
        verdict = "met" if to_floor["fwd_bwd"] <= 1.25 else "NOT met"
        print(f"  target: the floor allows only {allowed:.2f}x over (b) (< 3x), so within 1.25x of the floor "
              f"applies: {to_floor['fwd_bwd']:.2f}x, {verdict}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, layer in (peers["ours"], peers["a"]):
            for label, fn in (("forward", forward(layer)), ("forward+backward", forward_backward(layer))):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                print(f"\n{name.split()[0]} {label}:")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
