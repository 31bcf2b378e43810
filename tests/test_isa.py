"""Every CPU ISA level (scalar, avx2, avx512) against the reference and each other.

The CPU kernels are compiled once per level and the level is chosen at run
time (engram.ops.set_cpu_isa / ENGRAM_CPU_ISA). Each test runs its ops under
a level and checks, through the per-level call counters, that the kernels of
that level are the ones that ran. A level this machine's CPU lacks is skipped
with its reason; scripts/run_isa_tests.sh runs the op test files under each
level too.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import engram
from engram import CompressionTable, EngramConfig, NgramHasher, ops
from engram import _cpu_isa
from engram import reference as ref
from test_hash import random_compression, reference_ids
from test_layer_ops import assert_float32_matches, conv_inputs, gate_inputs, grads

LEVELS = ["scalar", "avx2", "avx512"]
F64 = torch.float64


def require(level):
    if level not in ops.cpu_isa_levels():
        pytest.skip(f"this machine's CPU lacks {level}; its levels are {ops.cpu_isa_levels()}")


def run_at(level, fn, ran=None):
    """fn() under `level`; asserts that kernels of `ran` (default: `level`) and no other level ran."""
    ran = level if ran is None else ran
    before = ops.cpu_isa_calls()
    with ops.use_cpu_isa(level) as used:
        assert used == level == engram.cpu_isa()
        result = fn()
    after = ops.cpu_isa_calls()
    calls = {lv: after[lv] - before[lv] for lv in LEVELS}
    assert calls[ran] > 0 and all(n == 0 for lv, n in calls.items() if lv != ran), (
        f"asked for {level}, expected only {ran} kernels to run; calls per level: {calls}"
    )
    return result


# --------------------------------------------------------------------------
# layer ops: forward and backward against the reference at every level
# --------------------------------------------------------------------------


def gate_case(dtype, d):
    inputs = gate_inputs(b=2, t=7, g=3, d=d, dtype=dtype, strided=True)
    return ops.context_gate, ref.context_gate, inputs, torch.randn(2, 7, 3, dtype=dtype)


def conv_case(dtype, d):
    # T well beyond the conv's reach of 3 * 3 tokens.
    inputs = conv_inputs(b=2, t=30, g=3, d=d, kernel_size=4, dtype=dtype, strided=True)
    return (lambda *a: ops.gated_short_conv(*a, 3), lambda *a: ref.gated_short_conv(*a, 3), inputs,
            torch.randn(2, 30, 3, d, dtype=dtype))


CASES = {"context_gate": gate_case, "gated_short_conv": conv_case}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d", [5, 8, 21])  # below, at and above the 8 reduction lanes, with a tail
def test_layer_ops_match_reference(level, op, dtype, d):
    require(level)
    fn, ref_fn, inputs, grad_out = CASES[op](dtype, d)
    out, got = run_at(level, lambda: grads(fn, inputs, grad_out))
    want_out, want = grads(ref_fn, inputs, grad_out)
    if dtype == F64:
        for g, w in zip((out, *got), (want_out, *want)):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
        return
    truth_out, truth = grads(ref_fn, [x.double() for x in inputs], grad_out.double())
    for g, w, t in zip((out, *got), (want_out, *want), (truth_out, *truth)):
        assert_float32_matches(g, w, t)


@pytest.mark.parametrize("level", LEVELS[1:])
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_ops_agree_with_the_scalar_level(level, op, dtype):
    # Every level sums the same 8 lanes in the same order; only FMA
    # contraction differs, so results agree to float32 rounding, which moves
    # a bf16 / fp16 result by at most one unit in the last place.
    require(level)
    fn, _, inputs, grad_out = CASES[op](torch.float32, 64)  # 64: whole AVX-512 vectors of float64 lanes
    inputs, grad_out = [x.to(dtype) for x in inputs], grad_out.to(dtype)
    out, got = run_at(level, lambda: grads(fn, inputs, grad_out))
    want_out, want = run_at("scalar", lambda: grads(fn, inputs, grad_out))
    eps = torch.finfo(dtype).eps
    for g, w in zip((out, *got), (want_out, *want)):
        assert g.dtype == dtype
        scale = w.double().abs().max().item()
        torch.testing.assert_close(g.double(), w.double(), rtol=2 * eps, atol=1e-5 * scale)


@pytest.mark.parametrize("level", LEVELS)
def test_gradcheck_at_each_level(level):
    require(level)
    gate_args = [x.requires_grad_() for x in gate_inputs(b=1, t=3, g=2, d=9)]
    conv_args = [x.requires_grad_() for x in conv_inputs(b=1, t=5, g=2, d=9)]
    run_at(level, lambda: torch.autograd.gradcheck(lambda *a: ops.context_gate(*a, 1e-3), gate_args))
    run_at(level, lambda: torch.autograd.gradcheck(lambda *a: ops.gated_short_conv(*a, 2), conv_args))


# --------------------------------------------------------------------------
# hashing, compression, embedding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", ["deepseek", "xxh64"])
@pytest.mark.parametrize("shape", [(3, 97), (2, 8192)])  # (2, 8192): a 2 MiB output, streamed on avx512
def test_hash_bit_exact_at_each_level(level, family, shape):
    # Head sizes below 2^26 (the reference's): the double-precision reduction
    # of the level on avx2 and avx512, Barrett on scalar.
    require(level)
    cfg = EngramConfig(hash=family)
    table = random_compression(129_280, 99_092)
    ids = torch.randint(0, 129_280, shape)
    got = run_at(level, lambda: NgramHasher(cfg, table).hash(ids))
    want = reference_ids(cfg, table, ids)
    for layer_id in cfg.layer_ids:
        np.testing.assert_array_equal(got[layer_id].numpy(), want[layer_id])


def edge_ids(vocab, pad_id, kind):
    if kind == "largest_id":  # the largest token id everywhere, and next to the pad
        ids = torch.full((2, 19), vocab - 1)
        ids[1, ::3] = pad_id
        return ids
    if kind == "pad_runs":  # long runs of the pad id, at the start, middle and end
        ids = torch.randint(0, vocab, (3, 40))
        ids[:, :9] = pad_id
        ids[1, 15:30] = pad_id
        ids[2, 33:] = pad_id
        return ids
    if kind == "t1":
        return torch.randint(0, vocab, (5, 1))
    return torch.randint(0, vocab, (4, 3000))  # random and big: many different mixes per head


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", ["deepseek", "xxh64"])
@pytest.mark.parametrize("kind", ["largest_id", "pad_runs", "t1", "random_big"])
@pytest.mark.parametrize("sizes", [[129280 * 5, 129280 * 5], [1009, 2**20 + 7], [2**26 - 2**12, 2**22]])
def test_hash_edge_inputs_at_each_level(level, family, kind, sizes):
    # Every head's column against the reference at head primes below 2^20
    # (one reduction step), between 2^20 and 2^26 (two) and small ones, N=3
    # and N=4 with a tail of heads (H=5 at N=4: vectors of 4 and 8 plus a rest).
    require(level)
    n, h = (3, 8) if sizes[0] == 129280 * 5 else (4, 5)
    cfg = EngramConfig(hash=family, engram_vocab_size=sizes + [3001] * (n - 1 - len(sizes)), max_ngram_size=n,
                       n_head_per_ngram=h, n_embed_per_ngram=8 * h, layer_ids=[1, 15])
    vocab = 129_280
    table = random_compression(vocab, 99_092)
    ids = edge_ids(vocab, cfg.pad_id, kind)
    got = run_at(level, lambda: NgramHasher(cfg, table).hash(ids))
    want = reference_ids(cfg, table, ids)
    for layer_id in cfg.layer_ids:
        assert got[layer_id].shape[-1] == (n - 1) * h
        np.testing.assert_array_equal(got[layer_id].numpy(), want[layer_id])


@pytest.mark.parametrize("level", LEVELS)
def test_hash_with_huge_heads_uses_the_scalar_reduction_at_each_level(level):
    # A head size of 2^31 is beyond the exact double arithmetic of the AVX-512
    # reduction: every level takes the scalar one.
    require(level)
    cfg = EngramConfig(engram_vocab_size=[2**31], max_ngram_size=2, n_head_per_ngram=2, n_embed_per_ngram=8,
                       layer_ids=[1])
    table = random_compression(5000, 3000)
    ids = torch.randint(0, 5000, (2, 33))
    got = run_at(level, lambda: NgramHasher(cfg, table).hash(ids), ran="scalar")
    np.testing.assert_array_equal(got[1].numpy(), reference_ids(cfg, table, ids)[1])


@pytest.mark.parametrize("level", LEVELS)
def test_compression_and_embedding_at_each_level(level):
    # No ISA-specific code in these kernels: same results at every level.
    require(level)
    with ops.use_cpu_isa(level):
        table = random_compression(1000, 700)
        ids = torch.randint(-5, 1000, (3, 50))
        assert np.array_equal(table.apply(ids).numpy(), ref.compress_ids(ids.numpy(), table.lookup.numpy()))
        sizes = [5, 7, 11, 3]
        offsets = ref.head_offsets(sizes)
        weight = torch.randn(sum(sizes), 8)
        hash_ids = torch.stack([torch.randint(0, s, (3, 40)) for s in sizes], dim=-1)
        grad_out = torch.randn(3, 40, 4, 8)
        w = weight.clone().requires_grad_()
        out = ops.multihead_embedding(w, hash_ids, offsets)
        out.backward(grad_out)
        w_ref = weight.clone().requires_grad_()
        want = ref.multihead_embedding(w_ref, hash_ids, offsets)
        want.backward(grad_out)
        assert torch.equal(out, want)
        torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# choosing the level
# --------------------------------------------------------------------------


def test_levels_and_default():
    levels = ops.cpu_isa_levels()
    assert levels == LEVELS[: len(levels)] and levels[0] == "scalar"
    # Unless ENGRAM_CPU_ISA asked for another, the best level is in use.
    wanted = os.environ.get("ENGRAM_CPU_ISA", "").strip().lower()
    assert engram.cpu_isa() == (levels[-1] if wanted in ("", "auto") else wanted)


def test_environment_level_is_in_use():
    # Under scripts/run_isa_tests.sh the op tests of this process ran at this level.
    wanted = os.environ.get("ENGRAM_CPU_ISA", "").strip().lower()
    if wanted in ("", "auto"):
        wanted = ops.cpu_isa_levels()[-1]
    assert engram.cpu_isa() == wanted
    run_at(wanted, lambda: ops.context_gate(*gate_inputs()))


def test_set_cpu_isa_returns_the_previous_level_and_auto_is_the_best():
    start = engram.cpu_isa()
    assert ops.set_cpu_isa("scalar") == start
    try:
        assert engram.cpu_isa() == "scalar"
        assert ops.set_cpu_isa(" AUTO ") == "scalar"
        assert engram.cpu_isa() == ops.cpu_isa_levels()[-1]
    finally:
        ops.set_cpu_isa(start)
    with ops.use_cpu_isa("scalar"):
        with pytest.raises(ValueError):
            ops.use_cpu_isa("sse4").__enter__()  # refused on entry
        assert engram.cpu_isa() == "scalar"
    assert engram.cpu_isa() == start


def test_unknown_level_is_a_clear_error():
    with pytest.raises(ValueError, match=r"set_cpu_isa: level='sse4' is not a CPU ISA level; expected one of "
                                         r"scalar, avx2, avx512 or auto"):
        ops.set_cpu_isa("sse4")
    with pytest.raises(TypeError, match=r"set_cpu_isa: level must be a str.*got int"):
        ops.set_cpu_isa(2)


def test_level_the_cpu_lacks_is_a_clear_error(monkeypatch):
    # Pretend the CPU stops at avx2, so the message is checked on any machine.
    real_state = _cpu_isa._state
    monkeypatch.setattr(_cpu_isa, "_state", lambda: (real_state()[0], "avx2", real_state()[2]))
    with pytest.raises(ValueError, match=r"set_cpu_isa: level='avx512' asks for x86-64-v4: AVX-512, but this CPU's "
                                         r"best level is 'avx2' \(x86-64-v3: AVX2 and FMA\); expected one of "
                                         r"scalar, avx2 or auto"):
        ops.set_cpu_isa("avx512")


def test_extension_refuses_a_level_the_cpu_lacks():
    # The C++ side checks too, whatever Python asked.
    start, best = engram.cpu_isa(), len(ops.cpu_isa_levels()) - 1
    for level in [-1, best + 1, 3]:
        with pytest.raises(ValueError, match=rf"_set_cpu_isa: level {level} is not available; .* up to {best}"):
            ops._C._set_cpu_isa(level)
    assert engram.cpu_isa() == start


def _import_engram_with(value):
    env = dict(os.environ, ENGRAM_CPU_ISA=value)
    code = "import engram; print(engram.cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_at_import():
    ok = _import_engram_with("Scalar")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "scalar"
    bad = _import_engram_with("avx3")
    assert bad.returncode != 0
    assert ("ValueError: ENGRAM_CPU_ISA='avx3' is not a CPU ISA level; expected one of scalar, avx2, avx512 or auto"
            in bad.stderr)
