"""Every engram op once on a device against the CPU kernels, and an EngramLayer
forward+backward in float32 and bfloat16: about 20 seconds on a GPU, one
PASS / FAIL line per item, so that the first minutes on a lent GPU tell
whether the CUDA build works at all before the long tests run.

    python benchmarks/gpu_smoke.py [--device cuda] [--json smoke.json]

--device cpu runs the same items CPU against CPU (they pass trivially): the
rehearsal of benchmarks/gpu_check.sh uses it to prove this script itself runs.
Exit status 1 when an item fails; --json writes the items as they finish.
"""

import argparse
import copy
import json
import sys
import time
import traceback

import torch

import engram
from engram import CompressionTable, EngramConfig, EngramLayer, NgramHasher, ops, optim
from engram import reference as ref


def close(got, want, dtype):
    """got (on the device) against want (CPU) within the dtype's tolerance:
    both kernels compute in float32 or wider and round once."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(), rtol=tol, atol=tol)


def equal(got, want):
    got = got.detach().cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        raise AssertionError(f"not bit-exact: {bad.shape[0]} of {want.numel()} entries differ, "
                             f"first at {bad[0].tolist()}")


def expect_deferred_error(fn, pattern):
    """A bad id: raised at the call (CPU) or left as a report that
    check_cuda_errors raises (CUDA), in both cases naming it."""
    import re

    try:
        fn()
        engram.check_cuda_errors()
    except (IndexError, ValueError) as err:
        if not re.search(pattern, str(err)):
            raise AssertionError(f"wrong error: {err}") from err
        return
    raise AssertionError(f"no error for a bad id (expected /{pattern}/)")


def items(device):
    dev = torch.device(device)
    cfg = EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[1, 3])
    table = CompressionTable(torch.randint(0, 400, (500,)).unique(return_inverse=True)[1])
    hasher = NgramHasher(cfg, table)
    ids = torch.randint(-2, 500, (3, 37))

    def compress_ids():
        lookup = table.lookup
        equal(ops.compress_ids(ids.to(dev), lookup.to(dev)), ops.compress_ids(ids, lookup))

    def ngram_hash(family):
        def run():
            h = NgramHasher(EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[1, 3], hash=family), table)
            for offs in (False, True):
                equal(h.hash_stacked(ids.to(dev), with_offsets=offs), h.hash_stacked(ids, with_offsets=offs))
        return run

    def embedding(dtype):
        def run():
            sizes = [5, 7, 11, 3]
            offsets = ref.head_offsets(sizes)
            weight = torch.randn(sum(sizes) + 1, 12).to(dtype)
            rows = torch.stack([torch.randint(0, s, (2, 19)) for s in sizes], dim=-1)
            for w in (weight[:-1], weight[1:]):  # aligned rows, then rows 16-byte unaligned
                got = ops.multihead_embedding(w.to(dev), rows.to(dev), offsets.to(dev))
                equal(got, ops.multihead_embedding(w, rows, offsets))
            grad = torch.randn(2, 19, 4, 12).to(dtype)
            backward = torch.ops.engram.multihead_embedding_backward
            got = backward(grad.to(dev), rows.to(dev), offsets.to(dev), sum(sizes))
            close(got, backward(grad, rows, offsets, sum(sizes)), dtype)
        return run

    def gather_rows():
        host = torch.randn(300, 5)
        rows = torch.randint(0, 300, (4, 9))
        want = host[rows]
        equal(ops.gather_rows(host.to(dev), rows.to(dev)), want)
        if dev.type == "cuda":
            equal(ops.gather_rows(host.pin_memory(), rows.to(dev)), want)  # zero copy over UVA

    def context_gate(dtype):
        def run():
            b, t, g, d = 2, 7, 3, 40  # d % 32 != 0
            key, hidden = torch.randn(b, t, g, d).to(dtype), torch.randn(b, t, g, d).to(dtype)
            wk, wq = (1 + 0.3 * torch.randn(g, d)).to(dtype), (1 + 0.3 * torch.randn(g, d)).to(dtype)
            grad = torch.randn(b, t, g).to(dtype)
            args = (key, hidden, wk, wq)
            close(ops.context_gate(*(x.to(dev) for x in args)), ops.context_gate(*args), dtype)
            got = torch.ops.engram.context_gate_backward(grad.to(dev), *(x.to(dev) for x in args))
            for a, w in zip(got, torch.ops.engram.context_gate_backward(grad, *args)):
                close(a, w, dtype)
        return run

    def short_conv(dtype):
        def run():
            b, t, g, d, k = 2, 9, 2, 20, 4  # d < 32
            args = (torch.randn(b, t, d).to(dtype), torch.rand(b, t, g).to(dtype),
                    (1 + 0.3 * torch.randn(g, d)).to(dtype), (torch.randn(g * d, k) / k).to(dtype))
            grad = torch.randn(b, t, g, d).to(dtype)
            got = ops.gated_short_conv(*(x.to(dev) for x in args), 2, 1e-5)
            close(got, ops.gated_short_conv(*args, 2, 1e-5), dtype)
            got = torch.ops.engram.gated_short_conv_backward(grad.to(dev), *(x.to(dev) for x in args), 2, 1e-5)
            for a, w in zip(got, torch.ops.engram.gated_short_conv_backward(grad, *args, 2, 1e-5)):
                close(a, w, dtype)
        return run

    def dedup_and_updates():
        num_rows, dh = 70, 20
        rows_in = torch.randint(0, num_rows, (5, 33, 2))
        rows_in[:, :, 0] %= 3  # hot rows: more than 32 entries each
        grad = torch.randn(5, 33, 2, dh)
        rows, row_grads = optim.dedup_row_grads(grad, rows_in, None, num_rows)
        rows_d, row_grads_d = optim.dedup_row_grads(grad.to(dev), rows_in.to(dev), None, num_rows)
        equal(rows_d, rows)
        close(row_grads_d, row_grads, torch.float32)
        w = torch.randn(num_rows, dh)
        state = {"sgd": [], "adagrad": [torch.rand(num_rows)],
                 "adam": [torch.randn(num_rows, dh), torch.rand(num_rows, dh)]}
        calls = {
            "sgd": lambda w, rows, g: optim.rowwise_sgd_update(w, rows, g, 0.1, 0.01),
            "adagrad": lambda w, s, rows, g: optim.rowwise_adagrad_update(w, s, rows, g, 0.1, 1e-8, 0.01),
            "adam": lambda w, m, v, rows, g: optim.rowwise_adam_update(w, m, v, rows, g, 0.1, 0.9, 0.99, 1e-8, 0.01,
                                                                       True, 3),
        }
        for rule, call in calls.items():
            cpu = [w.clone(), *[s.clone() for s in state[rule]]]
            gpu = [x.to(dev) for x in cpu]
            call(*cpu, rows, row_grads)
            call(*gpu, rows.to(dev), row_grads.to(dev))
            for a, b in zip(gpu, cpu):
                equal(a, b)  # the same IEEE operations on both devices

    def bad_ids():
        weight = torch.randn(10, 4, device=dev)
        expect_deferred_error(lambda: ops.multihead_embedding(weight, torch.tensor([[1, 10]], device=dev), None),
                              r"ids holds 10 at flat index 1")
        expect_deferred_error(lambda: hasher.hash(torch.full((2, 5), 500, device=dev)), r"input_ids holds 500")
        expect_deferred_error(lambda: ops.gather_rows(weight, torch.tensor([3, 11], device=dev)), r"rows holds 11")
        weight[0].sum().item()  # the device still works after the reports

    def layer(dtype):
        def run():
            torch.manual_seed(0)
            lc = EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0])
            cpu_layer = EngramLayer(lc, 0, hidden_size=48, hc_mult=2, compression=CompressionTable.identity(500))
            cpu_layer = cpu_layer.to(dtype)
            hidden = torch.randn(2, 13, 2, 48).to(dtype)
            tokens = torch.randint(0, 500, (2, 13))
            results = []
            for lay, d in ((cpu_layer, torch.device("cpu")), (copy.deepcopy(cpu_layer).to(dev), dev)):
                h = hidden.to(d).requires_grad_()
                out = lay(h, tokens.to(d))
                out.float().square().mean().backward()
                results.append([out, h.grad, *(p.grad for p in lay.parameters())])
            for got, want in zip(results[1], results[0]):
                close(got, want, dtype)
        return run

    def odd_sizes():
        # One token, rows of one element (unaligned), no ids at all: the edges
        # of every launch configuration, for compute-sanitizer above all.
        one = torch.randint(0, 500, (1, 1))
        equal(hasher.hash_stacked(one.to(dev)), hasher.hash_stacked(one))
        weight, rows = torch.randn(9, 1)[1:], torch.tensor([[3, 7]])
        equal(ops.multihead_embedding(weight.to(dev), rows.to(dev), None), ops.multihead_embedding(weight, rows, None))
        equal(ops.gather_rows(weight.to(dev), rows.to(dev)), ops.gather_rows(weight, rows))
        none = torch.empty(0, 2, dtype=torch.long)  # gather_rows takes no rows (the lookups reject no ids)
        equal(ops.gather_rows(weight.to(dev), none.to(dev)), ops.gather_rows(weight, none))
        args = (torch.randn(1, 1, 1, 1), torch.randn(1, 1, 1, 1), torch.ones(1, 1), torch.ones(1, 1))
        close(ops.context_gate(*(x.to(dev) for x in args)), ops.context_gate(*args), torch.float32)
        args = (torch.randn(1, 1, 33), torch.rand(1, 1, 1), torch.ones(1, 33), torch.randn(33, 3))
        close(ops.gated_short_conv(*(x.to(dev) for x in args), 1, 1e-5), ops.gated_short_conv(*args, 1, 1e-5),
              torch.float32)
        rows, row_grads = optim.dedup_row_grads(torch.ones(1, 1, 3, device=dev), torch.tensor([[4]], device=dev),
                                                None, 5)
        equal(rows, torch.tensor([4]))
        equal(row_grads, torch.ones(1, 3))

    def prefetched_training():
        # The host-table training path: prefetch, forward, backward, fused
        # row-wise step, against the same model with its table on the device.
        def train(placement, prefetch):
            torch.manual_seed(0)
            lc = EngramConfig(engram_vocab_size=[997, 1009], max_ngram_size=3, n_embed_per_ngram=16,
                              n_head_per_ngram=2, layer_ids=[1])
            layer = EngramLayer(lc, 1, 16, compression=CompressionTable.identity(300), table_placement=placement)
            layer = layer.to(dev)
            optimizer = optim.make_rowwise(layer, "adam", lr=0.05, fused=True)
            gen = torch.Generator().manual_seed(5)
            data = [torch.randint(0, 40, (2, 16), generator=gen).to(dev) for _ in range(4)]
            hidden = torch.randn(2, 16, 16, generator=gen).to(dev)
            prefetcher = engram.Prefetcher(layer) if prefetch else None
            if prefetcher:
                prefetcher.prefetch(data[0])
            for i, ids in enumerate(data):
                out = layer(hidden, ids)
                if prefetcher and i + 1 < len(data):
                    prefetcher.prefetch(data[i + 1])
                out.square().mean().backward()
                optimizer.step()
            if prefetcher:
                prefetcher.close()
            optimizer.remove()
            return layer.multi_head_embedding.embedding.weight.detach()

        close(train("host", True), train("device", False), torch.float32)

    yield "compress_ids", compress_ids
    yield "ngram_hash deepseek", ngram_hash("deepseek")
    yield "ngram_hash xxh64", ngram_hash("xxh64")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        yield f"multihead_embedding+backward {name}", embedding(dtype)
    yield "gather_rows device+pinned host", gather_rows
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        yield f"context_gate+backward {name}", context_gate(dtype)
        yield f"gated_short_conv+backward {name}", short_conv(dtype)
    yield "dedup_row_grads+sgd/adagrad/adam", dedup_and_updates
    yield "bad ids reported", bad_ids
    yield "odd sizes (one token, one-element rows, no rows)", odd_sizes
    yield "Prefetcher training, host table", prefetched_training
    yield "EngramLayer fwd+bwd float32", layer(torch.float32)
    yield "EngramLayer fwd+bwd bfloat16", layer(torch.bfloat16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the items here as they finish")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    results = []
    print(f"engram smoke on {args.device}: torch {torch.__version__}", flush=True)
    for name, fn in items(args.device):
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                engram.check_cuda_errors()  # nothing left over for the next item
            ok, error = True, None
        except Exception as err:  # one failing item must not hide the others
            ok, error = False, f"{type(err).__name__}: {err}".strip()[:600]
            traceback.print_exc(file=sys.stdout)
            try:
                engram.check_cuda_errors()
            except Exception:
                pass
        seconds = time.perf_counter() - start
        results.append({"name": name, "ok": ok, "seconds": round(seconds, 3), "error": error})
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({seconds * 1e3:.0f} ms){'' if ok else ': ' + error}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": args.device, "items": results}, f, indent=1)
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"smoke: {len(results) - len(failed)} of {len(results)} passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
