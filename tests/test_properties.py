"""Property-based tests (hypothesis) of every torch.ops.engram op.

Each example draws a case: shapes (one token, batch 1, several batch dims),
dtypes, layouts (transposed, strided, expanded views), values (negative ids,
ids at the table's edge, head sizes around the kernels' reduction limits,
dilations past the sequence) and, in test_<op>_fault[<fault>], one fault: a
wrong dtype (int32 or float ids, integer or float8 tables, mismatched
floating dtypes), a wrong or empty shape, an id out of range, an offset that
overflows, a bad scalar, or one tensor on another device ("meta", the one
every machine has). Then:

- a valid case matches engram.reference: ids bit for bit; floats within a
  bound on their rounding error (below);
- a faulty case raises the fault's exception type with a message that starts
  with the op's name and names the offending argument;
- the same call with every tensor on "meta" (the Meta kernel, which
  torch.compile traces with) returns the same shapes and dtypes, or raises
  the same error word for word (it runs the CPU kernel's checks,
  csrc/checks.cpp), except for faults only the values reveal;
- layer ops: float64 values match the float64 statement of engram.reference
  (and its autograd gradients) to 1e-9.

Ids must be int64 in every op: int32 (or float) ids are a TypeError naming
the argument and "Long", never a silent conversion.

Examples are derandomized (a fixed sequence per test) so that CI is
reproducible; sizes are small, and long sequences have their own tests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram import reference as ref

OPS = torch.ops.engram
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ERRORS = (TypeError, ValueError, IndexError, RuntimeError)


def props(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@dataclass
class Fault:
    error: type
    arg: str  # the argument the message must name
    static: bool = True  # False: only the values show it, so the fake kernel cannot see it


def valid_and_faulty(name: str, check: Callable, faults: dict, valid_examples: int, fault_examples: int = 4):
    """Tests test_<name> and test_<name>_fault of check(data, fault name): valid
    cases (fault None), and each fault on its own."""

    @props(valid_examples)
    @given(data=st.data())
    def test_valid(data):
        check(data, None)

    @pytest.mark.parametrize("fault", sorted(faults))
    @props(fault_examples)
    @given(data=st.data())
    def test_fault(data, fault):
        check(data, fault)

    test_valid.__name__ = test_valid.__qualname__ = f"test_{name}"
    test_fault.__name__ = test_fault.__qualname__ = f"test_{name}_fault"
    return test_valid, test_fault


def tensors_to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_case(op: str, fn: Callable, args: tuple, fault: Optional[Fault], compare: Callable) -> None:
    """The op on the CPU, then the same call on meta."""
    if fault is None:
        out = fn(*args)
        compare(out)
    else:
        with pytest.raises(fault.error) as info:
            fn(*args)
        message = str(info.value)
        assert message.startswith(f"{op}: ") and fault.arg in message, message
    try:
        meta_out = fn(*tensors_to(args, "meta"))
    except ERRORS as err:
        assert fault is not None and fault.static, f"the Meta kernel rejected what the CPU kernel does not: {err}"
        assert type(err) is type(info.value) and str(err) == message, f"meta: {err!r}\ncpu: {info.value!r}"
        return
    # Faults of values or devices are invisible on meta; every other one must raise there too.
    assert fault is None or not fault.static, f"the Meta kernel accepted a {fault}"
    if fault is None:
        for got, want in zip(as_tuple(meta_out), as_tuple(out), strict=True):
            assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


def move_one_to_meta(args: list, names: list, name: str) -> Fault:
    """Moves argument `name` to meta: a RuntimeError naming it (which all-meta calls cannot show)."""
    args[names.index(name)] = args[names.index(name)].to("meta")
    return Fault(RuntimeError, name, static=False)


def relayout(data, t: torch.Tensor, label: str, allow_expand: bool = True) -> torch.Tensor:
    """The same values (or, expanded, a repeat of one slice) in another memory layout."""
    choices = ["contiguous", "strided"]
    if t.dim() >= 2:
        choices += ["transposed", "permuted"]
    if allow_expand and t.dim() >= 1 and t.shape[0] > 1:
        choices.append("expanded")
    if t.dtype in (torch.float8_e4m3fn, torch.complex64):
        return t
    kind = data.draw(st.sampled_from(choices), label=f"layout of {label}")
    if kind == "strided" and t.dim() >= 1:
        big = torch.zeros((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype)
        big[::2] = t
        return big[::2]
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "permuted":
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    if kind == "expanded":
        return t[:1].expand_as(t)
    return t


def random_ints(gen: torch.Generator, low: int, high: int, shape) -> torch.Tensor:
    return torch.randint(low, high, tuple(shape), generator=gen, dtype=torch.int64)


# --------------------------------------------------------------------------
# compress_ids
# --------------------------------------------------------------------------

COMPRESS_FAULTS = {
    "input_ids int32": Fault(TypeError, "input_ids"),
    "input_ids float": Fault(TypeError, "input_ids"),
    "input_ids empty": Fault(ValueError, "input_ids"),
    "input_ids beyond vocabulary": Fault(IndexError, "input_ids", static=False),
    "lookup int32": Fault(TypeError, "lookup"),
    "lookup 2-d": Fault(ValueError, "lookup"),
    "lookup empty": Fault(ValueError, "lookup"),
    "input_ids on meta": Fault(RuntimeError, "device"),
    "lookup on meta": Fault(RuntimeError, "device"),
}


def check_compress_ids(data, name):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    shape = data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=3), label="shape")
    vocab = data.draw(st.integers(1, 40), label="vocab")
    ids = random_ints(gen, -4, vocab, shape)  # negative ids pass through
    lookup = random_ints(gen, INT64_MIN, INT64_MAX, (vocab,))
    fault = COMPRESS_FAULTS.get(name)
    if name == "input_ids int32":
        ids = ids.int()
    elif name == "input_ids float":
        ids = ids.float()
    elif name == "input_ids empty":
        ids = ids.reshape(-1)[:0].reshape(0, *shape[1:])
    elif name == "input_ids beyond vocabulary":
        ids.view(-1)[data.draw(st.integers(0, ids.numel() - 1))] = vocab + data.draw(st.integers(0, 3))
    elif name == "lookup int32":
        lookup = lookup.int()
    elif name == "lookup 2-d":
        lookup = lookup[None]
    elif name == "lookup empty":
        lookup = lookup[:0]
    ids = relayout(data, ids, "input_ids", allow_expand=fault is None or fault.arg != "input_ids")
    args, names = [ids, lookup], ["input_ids", "lookup"]
    if name is not None and name.endswith("on meta"):
        fault = move_one_to_meta(args, names, name.split()[0])

    def compare(out):
        assert out.shape == ids.shape and out.dtype == torch.int64 and out.is_contiguous()
        np.testing.assert_array_equal(out.numpy(), ref.compress_ids(ids.numpy(), lookup.numpy()))

    check_case("compress_ids", OPS.compress_ids, tuple(args), fault, compare)


test_compress_ids, test_compress_ids_fault = valid_and_faulty("compress_ids", check_compress_ids, COMPRESS_FAULTS, 40)


# --------------------------------------------------------------------------
# ngram_hash
# --------------------------------------------------------------------------

NGRAM_FAULTS = {
    "input_ids int32": Fault(TypeError, "input_ids"),
    "input_ids float": Fault(TypeError, "input_ids"),
    "input_ids 1-d": Fault(ValueError, "input_ids"),
    "input_ids 3-d": Fault(ValueError, "input_ids"),
    "input_ids no sequence": Fault(ValueError, "input_ids"),
    "input_ids no token": Fault(ValueError, "input_ids"),
    "input_ids beyond vocabulary": Fault(IndexError, "input_ids", static=False),
    "lookup int32": Fault(TypeError, "lookup"),
    "lookup 2-d": Fault(ValueError, "lookup"),
    "lookup empty": Fault(ValueError, "lookup"),
    "keys int32": Fault(TypeError, "keys"),
    "keys order 1": Fault(ValueError, "keys"),
    "keys order 17": Fault(ValueError, "keys"),
    "keys no layer": Fault(ValueError, "keys"),
    "head_sizes int32": Fault(TypeError, "head_sizes"),
    "head_sizes one row too many": Fault(ValueError, "head_sizes"),
    "head_sizes columns": Fault(ValueError, "head_sizes"),
    "head_sizes below 1": Fault(ValueError, "head_sizes", static=False),
    "offsets int32": Fault(TypeError, "offsets"),
    "offsets shape": Fault(ValueError, "offsets"),
    "offsets overflow": Fault(ValueError, "offsets", static=False),
    "pad_id negative": Fault(IndexError, "pad_id"),
    "pad_id beyond vocabulary": Fault(IndexError, "pad_id"),
    "family md5": Fault(ValueError, "family"),
    "lookup on meta": Fault(RuntimeError, "device"),
    "keys on meta": Fault(RuntimeError, "device"),
    "head_sizes on meta": Fault(RuntimeError, "device"),
    "offsets on meta": Fault(RuntimeError, "device"),
}

# Head sizes around the kernels' reduction boundaries: the AVX-512 path takes
# sizes below 2^26 (one reduction step below 2^20), the scalar path any size.
SIZE_RANGES = {"tiny": (1, 40), "below 2^20": (1, 2**20), "2^20..2^26": (2**20 - 2, 2**26 + 2),
               "any": (1, INT64_MAX)}


def ngram_reference(ids, lookup, keys, sizes, offsets, pad_id, family, layer_ids, seed):
    n_layers, k = sizes.shape
    n = keys.shape[1] if family == "deepseek" else keys.shape[1] + 1
    heads = k // (n - 1)
    primes = {layer: sizes[i].tolist() for i, layer in enumerate(layer_ids)}
    if family == "deepseek":
        mult = {layer: keys[i].numpy() for i, layer in enumerate(layer_ids)}
        out = ref.ngram_hash(ids.numpy(), lookup.numpy(), mult, primes, n, heads, pad_id)
    else:
        out = ref.ngram_hash_xxh64(ids.numpy(), lookup.numpy(), seed, layer_ids, primes, n, heads, pad_id)
    out = torch.from_numpy(np.stack([out[layer] for layer in layer_ids]))
    return out if offsets is None else out + offsets[:, None, None, :]


def check_ngram_hash(data, name):
    py = random.Random(data.draw(st.integers(0, 2**31), label="seed"))
    gen = torch.Generator().manual_seed(py.randrange(2**31))
    family = data.draw(st.sampled_from(["deepseek", "xxh64"]), label="family")
    n = data.draw(st.sampled_from([2, 3, 4, 5, 16]), label="N")
    heads = data.draw(st.integers(1, 9), label="H")
    n_layers = data.draw(st.integers(1, 3), label="L")
    b, t = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 12), label="T")
    if family == "xxh64":  # the reference hashes token by token in Python
        b, t = min(b, 2), min(t, 6)
    vocab = data.draw(st.integers(1, 30), label="vocab")
    k = (n - 1) * heads
    low, high = SIZE_RANGES[data.draw(st.sampled_from(sorted(SIZE_RANGES)), label="head sizes")]
    sizes = torch.tensor([[py.randint(low, high) for _ in range(k)] for _ in range(n_layers)])
    layer_ids = sorted(py.sample(range(1, 40), n_layers))
    seed = py.randrange(2**31)
    if family == "deepseek":
        keys = random_ints(gen, INT64_MIN, INT64_MAX, (n_layers, n))  # any int64: products wrap like numpy's
    else:
        keys = torch.tensor([[ref.xxh64_seed(seed, layer, order) for order in range(2, n + 1)] for layer in layer_ids],
                            dtype=torch.uint64).view(torch.int64)
    lookup = random_ints(gen, INT64_MIN, INT64_MAX, (vocab,)) if py.random() < 0.5 else torch.randperm(vocab, generator=gen)
    ids = random_ints(gen, -3, vocab, (b, t))
    pad_id = py.randrange(vocab)
    offsets = None
    if data.draw(st.booleans(), label="offsets"):
        # any offset whose head's ids stay within int64, negative ones included
        offsets = torch.tensor([[py.randint(-(2**62), INT64_MAX - (s - 1)) for s in row] for row in sizes.tolist()])

    if name in ("offsets int32", "offsets shape", "offsets overflow", "offsets on meta") and offsets is None:
        offsets = torch.zeros_like(sizes)
    fault = NGRAM_FAULTS.get(name)
    if name == "input_ids int32":
        ids = ids.int()
    elif name == "input_ids float":
        ids = ids.double()
    elif name == "input_ids 1-d":
        ids = ids.reshape(-1)
    elif name == "input_ids 3-d":
        ids = ids[None]
    elif name == "input_ids no sequence":
        ids = ids[:0]
    elif name == "input_ids no token":
        ids = ids[:, :0]
    elif name == "input_ids beyond vocabulary":
        ids[py.randrange(b), py.randrange(t)] = vocab + py.randrange(3)
    elif name == "lookup int32":
        lookup = lookup.int()
    elif name == "lookup 2-d":
        lookup = lookup[None]
    elif name == "lookup empty":
        lookup = lookup[:0]
    elif name == "keys int32":
        keys = keys.int()
    elif name == "keys order 1":
        keys = keys[:, :1] if family == "deepseek" else keys[:, :0]
    elif name == "keys order 17":
        keys = torch.cat([keys, keys.new_ones(n_layers, 17 - n)], dim=1)
    elif name == "keys no layer":
        keys = keys[:0]
    elif name == "head_sizes int32":
        sizes = sizes.int()
    elif name == "head_sizes one row too many":
        sizes = torch.cat([sizes, sizes[:1]])
    elif name == "head_sizes columns":
        sizes = sizes[:, : k - 1] if n > 2 else sizes[:, :0]
    elif name == "head_sizes below 1":
        sizes[py.randrange(n_layers), py.randrange(k)] = py.choice([0, -1, INT64_MIN])
    elif name == "offsets int32":
        offsets = offsets.int()
    elif name == "offsets shape":
        offsets = offsets[:, :-1]
    elif name == "offsets overflow":
        i, j = py.randrange(n_layers), py.randrange(k)
        sizes[i, j] = max(int(sizes[i, j]), 2)  # a head of one row cannot overflow
        offsets[i, j] = INT64_MAX - int(sizes[i, j]) + 2  # its last id would be INT64_MAX + 1
    elif name == "pad_id negative":
        pad_id = -py.randint(1, 3)
    elif name == "pad_id beyond vocabulary":
        pad_id = vocab + py.randrange(3)
    elif name == "family md5":
        family = "md5"
    ids = relayout(data, ids, "input_ids", allow_expand=name != "input_ids beyond vocabulary")
    sizes = relayout(data, sizes, "head_sizes", allow_expand=False)
    args = [ids, lookup, keys, sizes, offsets, pad_id, family]
    names = ["input_ids", "lookup", "keys", "head_sizes", "offsets"]
    if name is not None and name.endswith("on meta"):
        fault = move_one_to_meta(args, names, name.split()[0])

    def compare(out):
        assert out.shape == (n_layers, b, t, k) and out.dtype == torch.int64
        want = ngram_reference(ids, lookup, keys, sizes, offsets, pad_id, family, layer_ids, seed)
        assert torch.equal(out, want)

    check_case("ngram_hash", OPS.ngram_hash, tuple(args), fault, compare)


test_ngram_hash, test_ngram_hash_fault = valid_and_faulty("ngram_hash", check_ngram_hash, NGRAM_FAULTS, 80)


# --------------------------------------------------------------------------
# multihead_embedding and its backward
# --------------------------------------------------------------------------

EMBEDDING_FAULTS = {
    "ids int32": Fault(TypeError, "ids"),
    "ids float": Fault(TypeError, "ids"),
    "ids bool": Fault(TypeError, "ids"),
    "ids 0-dim": Fault(ValueError, "ids"),
    "ids empty": Fault(ValueError, "ids"),
    "ids negative row": Fault(IndexError, "ids", static=False),
    "ids beyond the table": Fault(IndexError, "ids", static=False),
    "ids plus offsets overflow": Fault(IndexError, "ids", static=False),
    "offsets int32": Fault(TypeError, "offsets"),
    "offsets 2-d": Fault(ValueError, "offsets"),
    "offsets one too many": Fault(ValueError, "offsets"),
    "ids on meta": Fault(RuntimeError, "device"),
    "offsets on meta": Fault(RuntimeError, "device"),
}
FORWARD_FAULTS = {
    **EMBEDDING_FAULTS,
    "weight int64": Fault(TypeError, "weight"),
    "weight float8": Fault(TypeError, "weight"),
    "weight complex": Fault(TypeError, "weight"),
    "weight 1-d": Fault(ValueError, "weight"),
    "weight 3-d": Fault(ValueError, "weight"),
    "weight rows of no values": Fault(ValueError, "weight"),
    "weight on meta": Fault(RuntimeError, "device"),
}
BACKWARD_FAULTS = {
    **EMBEDDING_FAULTS,
    "grad int64": Fault(TypeError, "grad"),
    "grad float8": Fault(TypeError, "grad"),
    "grad shape": Fault(ValueError, "grad"),
    "grad rows of no values": Fault(ValueError, "grad"),
    "num_rows 0": Fault(ValueError, "num_rows"),
    "num_rows too big for memory": Fault(ValueError, "num_rows"),
    "num_rows below a row": Fault(IndexError, "ids", static=False),
    "grad on meta": Fault(RuntimeError, "device"),
}


def draw_embedding_case(data, faults, name):
    """-> (ids, offsets, rows, dh, dtype, gen, py, fault name, fault); ids valid unless the fault says otherwise."""
    py = random.Random(data.draw(st.integers(0, 2**31), label="seed"))
    gen = torch.Generator().manual_seed(py.randrange(2**31))
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    k = data.draw(st.integers(1, 5), label="K")
    batch = data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=3), label="batch")
    dh = data.draw(st.integers(1, 9), label="Dh")
    sizes = [py.randint(1, 12) for _ in range(k)]
    if data.draw(st.booleans(), label="offsets"):
        offsets = ref.head_offsets(sizes)
        rows = sum(sizes)
        ids = torch.stack([random_ints(gen, 0, s, batch) for s in sizes], dim=-1)
        # A negative id is fine while id + offset is a row.
        if offsets[-1] > 0 and py.random() < 0.3:
            ids[..., -1] = -random_ints(gen, 1, int(offsets[-1]) + 1, batch)
    else:
        offsets, rows = None, py.randint(1, 40)
        ids = random_ints(gen, 0, rows, (*batch, k))
    if name in ("offsets int32", "offsets 2-d", "offsets one too many", "offsets on meta",
                "ids plus offsets overflow") and offsets is None:
        offsets = torch.zeros(k, dtype=torch.int64)
    fault = faults.get(name)
    flat = ids.view(-1)
    pos = py.randrange(flat.numel())
    shift = 0 if offsets is None else int(offsets[pos % k])
    if name == "ids int32":
        ids = ids.int()
    elif name == "ids float":
        ids = ids.float()
    elif name == "ids bool":
        ids = ids > 0
    elif name == "ids 0-dim":
        ids = ids.reshape(-1)[0]
    elif name == "ids empty":
        ids = ids[..., :0] if py.random() < 0.5 else ids.reshape(-1, k)[:0]
    elif name == "ids negative row":
        flat[pos] = -shift - py.randint(1, 3)
    elif name == "ids beyond the table":
        flat[pos] = rows - shift + py.randrange(3)
    elif name == "ids plus offsets overflow":
        # two positive values past INT64_MAX, or two negative ones that would wrap to a valid row
        if py.random() < 0.5:
            offsets[pos % k] = py.randint(1, 2**40)
            flat[pos] = INT64_MAX - int(offsets[pos % k]) + 1 + py.randrange(3)
        else:
            offsets[pos % k] = INT64_MIN
            flat[pos] = INT64_MIN + py.randrange(rows)
    elif name == "offsets int32":
        offsets = offsets.int()
    elif name == "offsets 2-d":
        offsets = offsets[None]
    elif name == "offsets one too many":
        offsets = torch.cat([offsets, offsets[:1]])
    # Expanding repeats the first slice of dim 0: a batch dim, never the heads (ids of one head fit only it).
    expand = (fault is None or fault.static) and ids.dim() >= 2
    ids = relayout(data, ids, "ids", allow_expand=expand) if ids.dim() else ids
    return ids, offsets, rows, dh, dtype, gen, py, name, fault


def check_multihead_embedding(data, name):
    ids, offsets, rows, dh, dtype, gen, py, name, fault = draw_embedding_case(data, FORWARD_FAULTS, name)
    weight = torch.randn(rows, dh, generator=gen).to(dtype)
    if name == "weight int64":
        weight = weight.long()
    elif name == "weight float8":
        weight = weight.to(torch.float8_e4m3fn)
    elif name == "weight complex":
        weight = weight.to(torch.complex64)
    elif name == "weight 1-d":
        weight = weight.reshape(-1)
    elif name == "weight 3-d":
        weight = weight[None]
    elif name == "weight rows of no values":
        weight = weight[:, :0]
    weight = relayout(data, weight, "weight", allow_expand=False)
    args = [weight, ids, offsets, data.draw(st.booleans(), label="sparse")]
    if name is not None and name.endswith("on meta"):
        fault = move_one_to_meta(args, ["weight", "ids", "offsets"], name.split()[0])

    def compare(out):
        want = ref.multihead_embedding(weight, ids, offsets)
        assert out.dtype == dtype and torch.equal(out, want)

    check_case("multihead_embedding", OPS.multihead_embedding, tuple(args), fault, compare)


test_multihead_embedding, test_multihead_embedding_fault = valid_and_faulty(
    "multihead_embedding", check_multihead_embedding, FORWARD_FAULTS, 60)


def assert_scatter_sum_close(got, grad, ids, offsets, rows):
    """Each row of `got` is a sum of grad rows: within the rounding bound of that sum.

    The kernel adds a row's n terms in opmath precision (float32 for half
    types) and rounds once to the dtype: |got - exact| <= n * eps(opmath) *
    sum|terms| + eps(dtype) * |exact|, per element, from the float64 sums.
    """
    dh = grad.shape[-1]
    flat_rows = (ids if offsets is None else ids + offsets).reshape(-1)
    terms = grad.reshape(len(flat_rows), dh).double()
    exact = torch.zeros(rows, dh, dtype=torch.float64).index_add_(0, flat_rows, terms)
    magnitude = torch.zeros(rows, dh, dtype=torch.float64).index_add_(0, flat_rows, terms.abs())
    count = torch.zeros(rows, dtype=torch.float64).index_add_(0, flat_rows, torch.ones(len(flat_rows), dtype=torch.float64))
    opmath = torch.float64 if grad.dtype == torch.float64 else torch.float32
    bound = count[:, None] * torch.finfo(opmath).eps * magnitude + torch.finfo(grad.dtype).eps * exact.abs()
    assert got.shape == (rows, dh) and got.dtype == grad.dtype
    assert ((got.double() - exact).abs() <= bound).all()


def check_multihead_embedding_backward(data, name):
    ids, offsets, rows, dh, dtype, gen, py, name, fault = draw_embedding_case(data, BACKWARD_FAULTS, name)
    grad = torch.randn((*ids.shape, dh), generator=gen).to(dtype) if ids.dim() else torch.randn(dh).to(dtype)
    num_rows = rows
    if name == "grad int64":
        grad = grad.long()
    elif name == "grad float8":
        grad = grad.to(torch.float8_e4m3fn)
    elif name == "grad shape":
        grad = grad[..., :1, :] if grad.dim() >= 2 and grad.shape[-2] > 1 else grad[None]
    elif name == "num_rows 0":
        num_rows = -py.randrange(2)
    elif name == "grad rows of no values":
        grad = grad[..., :0]
    elif name == "num_rows too big for memory":
        num_rows = 2**62
    elif name == "num_rows below a row":
        num_rows = int((ids if offsets is None else ids + offsets).max())
        if num_rows < 1:
            fault = Fault(ValueError, "num_rows")
    if grad.dim() >= 2:
        grad = relayout(data, grad, "grad", allow_expand=True)
    args = [grad, ids, offsets, num_rows]
    if name is not None and name.endswith("on meta"):
        fault = move_one_to_meta(args, ["grad", "ids", "offsets"], name.split()[0])

    check_case("multihead_embedding_backward", OPS.multihead_embedding_backward, tuple(args), fault,
               lambda out: assert_scatter_sum_close(out, grad, ids, offsets, num_rows))


test_multihead_embedding_backward, test_multihead_embedding_backward_fault = valid_and_faulty(
    "multihead_embedding_backward", check_multihead_embedding_backward, BACKWARD_FAULTS, 60)


# --------------------------------------------------------------------------
# layer ops: context_gate, gated_short_conv and their backwards
# --------------------------------------------------------------------------

# Forward: |ours - truth| <= rtol * |truth| + atol per element, truth = the
# reference in float64 on the same (rounded) inputs. Our kernels compute in
# float32 (float64 for double) and round once, so rtol is twice one rounding
# of the dtype. float32's atol covers the gate near a score of 0, where
# sqrt|s| magnifies the score's rounding error up to ~100x.
FORWARD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-4),
               torch.bfloat16: (2**-8, 1e-4), torch.float16: (2**-10, 1e-4)}
# Backward, per gradient tensor: max |ours - truth| <= rtol * max(max |truth|,
# 1% of the op's largest gradient). The floor: a gradient far smaller than its
# siblings (through an RMSNorm over D = 1, which is nearly constant, it is
# ~eps) is a difference of terms of the siblings' size, resolved only to
# rtol of those, by the reference as by us.
BACKWARD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def assert_forward_close(got, truth, dtype):
    rtol, atol = FORWARD_TOL[dtype]
    assert got.dtype == dtype and got.shape == truth.shape
    excess = (got.double() - truth).abs() - (rtol * truth.abs() + atol)
    assert excess.max().item() <= 0, f"{dtype}: max |ours - float64| = {(got.double() - truth).abs().max().item():.3g}"


def assert_backward_close(got, truth, dtype):
    largest = max(w.abs().max().item() for w in truth)
    for g, w in zip(got, truth, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        err, scale = (g.double() - w).abs().max().item(), max(w.abs().max().item(), 0.01 * largest)
        assert err <= BACKWARD_RTOL[dtype] * scale, f"{dtype}: error {err:.3g} vs max |grad| {scale:.3g}"


def float64_grads(fn, inputs, grad_out, *rest):
    inputs = [x.detach().double().requires_grad_() for x in inputs]
    out = fn(*inputs, *rest)
    return out.detach(), torch.autograd.grad(out, inputs, grad_out.double())


def assert_float64_equal(out, truth_out, truth_grads, backward):
    """float64 kernels against the float64 reference, to 1e-9."""
    for got, want in zip(as_tuple(out), truth_grads if backward else (truth_out,), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def float_layout(data, t, label):
    return relayout(data, t, label, allow_expand=True)


GATE_FAULTS = {
    "key int64": Fault(TypeError, "key"),
    "key float8": Fault(TypeError, "key"),
    "key 3-d": Fault(ValueError, "key"),
    "key empty": Fault(ValueError, "key"),
    "hidden other dtype": Fault(TypeError, "hidden"),
    "hidden shape": Fault(ValueError, "hidden"),
    "key_norm_weight other dtype": Fault(TypeError, "key_norm_weight"),
    "key_norm_weight shape": Fault(ValueError, "key_norm_weight"),
    "hidden_norm_weight other dtype": Fault(TypeError, "hidden_norm_weight"),
    "hidden_norm_weight shape": Fault(ValueError, "hidden_norm_weight"),
    "eps negative": Fault(ValueError, "eps"),
    "eps nan": Fault(ValueError, "eps"),
    "eps inf": Fault(ValueError, "eps"),
    "key on meta": Fault(RuntimeError, "device"),
    "hidden on meta": Fault(RuntimeError, "device"),
    "key_norm_weight on meta": Fault(RuntimeError, "device"),
    "hidden_norm_weight on meta": Fault(RuntimeError, "device"),
}
GATE_BACKWARD_FAULTS = {
    **GATE_FAULTS,
    "grad_gate shape": Fault(ValueError, "grad_gate"),
    "grad_gate other dtype": Fault(TypeError, "grad_gate"),
    "grad_gate on meta": Fault(RuntimeError, "device"),
}


def other_float(dtype):
    return torch.float64 if dtype != torch.float64 else torch.float32


def away_from_zero_scores(key, hidden, wk, wq, eps, gen):
    """Redraws the key rows whose gate score is within 0.05 of 0: below float64,
    a score that close to 0 is not resolved, and the gate's gradient there
    (~1/sqrt|s|) amplifies its rounding error past any dtype bound."""
    for _ in range(50):
        d = key.shape[-1]
        nk = torch.nn.functional.rms_norm(key.double(), (d,), None, eps) * wk.double()
        nq = torch.nn.functional.rms_norm(hidden.double(), (d,), None, eps) * wq.double()
        close = ((nk * nq).sum(-1) / math.sqrt(d)).abs() < 0.05
        if not close.any():
            return key
        key = torch.where(close[..., None], torch.randn(key.shape, generator=gen).to(key.dtype), key)
    return key


def run_layer_case(op, args, fault, dtype, backward, truth):
    """A layer-op case: the op against truth() = (float64 output, float64 grads)."""

    def compare(out):
        truth_out, truth_grads = truth()
        if backward:
            assert_backward_close(out, truth_grads, dtype)
        else:
            assert_forward_close(out, truth_out, dtype)
        if dtype == torch.float64:
            assert_float64_equal(out, truth_out, truth_grads, backward)

    check_case(op, getattr(OPS, op), tuple(args), fault, compare)


def check_context_gate(data, name, backward):
    op = "context_gate_backward" if backward else "context_gate"
    py = random.Random(data.draw(st.integers(0, 2**31), label="seed"))
    gen = torch.Generator().manual_seed(py.randrange(2**31))
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    b, t = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 6), label="T")
    # D = 1 backward in float64 only: RMSNorm over one value is nearly constant,
    # its gradient a difference of terms (x^2+eps)/eps times larger, which
    # float32 does not resolve (the reference does not either).
    dims = [1, 2, 7, 16, 33, 64] if not backward or dtype == torch.float64 else [2, 7, 16, 33, 64]
    g, d = data.draw(st.integers(1, 4), label="G"), data.draw(st.sampled_from(dims), label="D")
    eps = data.draw(st.sampled_from([None, 0.0, 1e-6, 1e-5, 1e-2]), label="eps")
    scale = data.draw(st.sampled_from([1e-2, 1.0, 30.0]), label="scale")
    key = (scale * torch.randn(b, t, g, d, generator=gen)).to(dtype)
    hidden = torch.randn(b, t, g, d, generator=gen).to(dtype)
    wk = (1 + 0.3 * torch.randn(g, d, generator=gen)).to(dtype)
    wq = (1 + 0.3 * torch.randn(g, d, generator=gen)).to(dtype)
    eps_value = torch.finfo(dtype).eps if eps is None else eps  # eps=None: the dtype's epsilon
    if backward and dtype != torch.float64:
        key = away_from_zero_scores(key, hidden, wk, wq, eps_value, gen)
    grad_gate = torch.randn(b, t, g, generator=gen).to(dtype)
    fault = (GATE_BACKWARD_FAULTS if backward else GATE_FAULTS).get(name)
    if name == "key int64":
        key = key.long()
    elif name == "key float8":
        key = key.to(torch.float8_e4m3fn)
    elif name == "key 3-d":
        key = key.flatten(-2)
    elif name == "key empty":
        key, hidden, grad_gate = key[:, :0], hidden[:, :0], grad_gate[:, :0]
    elif name == "hidden other dtype":
        hidden = hidden.to(other_float(dtype))
    elif name == "hidden shape":
        hidden = hidden[..., : d - 1] if d > 1 else torch.cat([hidden, hidden], -1)
    elif name == "key_norm_weight other dtype":
        wk = wk.to(other_float(dtype))
    elif name == "key_norm_weight shape":
        wk = wk.t() if g != d else wk[None]
    elif name == "hidden_norm_weight other dtype":
        wq = wq.to(other_float(dtype))
    elif name == "hidden_norm_weight shape":
        wq = wq.reshape(-1)
    elif name == "eps negative":
        eps = -1e-5
    elif name == "eps nan":
        eps = float("nan")
    elif name == "eps inf":
        eps = float("inf")
    elif name == "grad_gate shape":
        grad_gate = grad_gate[..., None]
    elif name == "grad_gate other dtype":
        grad_gate = grad_gate.to(other_float(dtype))
    if fault is None or fault.static:
        # Expanding key or hidden repeats rows: scores near 0 would come back.
        expand = not backward or dtype == torch.float64
        key, hidden = relayout(data, key, "key", expand), relayout(data, hidden, "hidden", expand)
        wk, grad_gate = float_layout(data, wk, "key_norm_weight"), float_layout(data, grad_gate, "grad_gate")
    args = [key, hidden, wk, wq, eps]
    names = ["key", "hidden", "key_norm_weight", "hidden_norm_weight"]
    if backward:
        args, names = [grad_gate, *args], ["grad_gate", *names]
    if name is not None and name.endswith("on meta"):
        fault = move_one_to_meta(args, names, name.split()[0])

    run_layer_case(op, args, fault, dtype, backward,
                   lambda: float64_grads(ref.context_gate, [key, hidden, wk, wq], grad_gate, eps_value))


test_context_gate, test_context_gate_fault = valid_and_faulty(
    "context_gate", lambda data, name: check_context_gate(data, name, False), GATE_FAULTS, 40)
test_context_gate_backward, test_context_gate_backward_fault = valid_and_faulty(
    "context_gate_backward", lambda data, name: check_context_gate(data, name, True), GATE_BACKWARD_FAULTS, 40)


CONV_FAULTS = {
    "value int64": Fault(TypeError, "value"),
    "value float8": Fault(TypeError, "value"),
    "value 4-d": Fault(ValueError, "value"),
    "value empty": Fault(ValueError, "value"),
    "gate other dtype": Fault(TypeError, "gate"),
    "gate 2-d": Fault(ValueError, "gate"),
    "gate other tokens": Fault(ValueError, "gate"),
    "norm_weight other dtype": Fault(TypeError, "norm_weight"),
    "norm_weight shape": Fault(ValueError, "norm_weight"),
    "conv_weight other dtype": Fault(TypeError, "conv_weight"),
    "conv_weight 3-d": Fault(ValueError, "conv_weight"),
    "conv_weight channels": Fault(ValueError, "conv_weight"),
    "conv_weight no tap": Fault(ValueError, "conv_weight"),
    "dilation 0": Fault(ValueError, "dilation"),
    "dilation negative": Fault(ValueError, "dilation"),
    "eps negative": Fault(ValueError, "eps"),
    "eps nan": Fault(ValueError, "eps"),
    "value on meta": Fault(RuntimeError, "device"),
    "gate on meta": Fault(RuntimeError, "device"),
    "norm_weight on meta": Fault(RuntimeError, "device"),
    "conv_weight on meta": Fault(RuntimeError, "device"),
}
CONV_BACKWARD_FAULTS = {
    **CONV_FAULTS,
    "grad_out shape": Fault(ValueError, "grad_out"),
    "grad_out other dtype": Fault(TypeError, "grad_out"),
    "grad_out on meta": Fault(RuntimeError, "device"),
}


def check_gated_short_conv(data, name, backward):
    op = "gated_short_conv_backward" if backward else "gated_short_conv"
    py = random.Random(data.draw(st.integers(0, 2**31), label="seed"))
    gen = torch.Generator().manual_seed(py.randrange(2**31))
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    b, t = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 12), label="T")
    g, d = data.draw(st.integers(1, 3), label="G"), data.draw(st.sampled_from([1, 3, 8, 17]), label="D")
    kernel_size = data.draw(st.integers(1, 5), label="kernel_size")
    # Past T every dilation gives dilation T's result; 2^62 must not overflow or allocate its reach.
    dilation = data.draw(st.sampled_from([1, 2, 3, 5, 11, 13, 2**40, 2**62]), label="dilation")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 1e-2]), label="eps")
    value = torch.randn(b, t, d, generator=gen).to(dtype)
    gate = torch.rand(b, t, g, generator=gen).to(dtype)
    norm_weight = (1 + 0.3 * torch.randn(g, d, generator=gen)).to(dtype)
    conv_weight = (torch.randn(g * d, kernel_size, generator=gen) / kernel_size).to(dtype)
    grad_out = torch.randn(b, t, g, d, generator=gen).to(dtype)
    fault = (CONV_BACKWARD_FAULTS if backward else CONV_FAULTS).get(name)
    if name == "value int64":
        value = value.long()
    elif name == "value float8":
        value = value.to(torch.float8_e4m3fn)
    elif name == "value 4-d":
        value = value[None]
    elif name == "value empty":
        value = value[:, :, :0]
    elif name == "gate other dtype":
        gate = gate.to(other_float(dtype))
    elif name == "gate 2-d":
        gate = gate[..., 0]
    elif name == "gate other tokens":
        gate = torch.cat([gate, gate[:, :1]], dim=1)
    elif name == "norm_weight other dtype":
        norm_weight = norm_weight.to(other_float(dtype))
    elif name == "norm_weight shape":
        norm_weight = norm_weight[None]
    elif name == "conv_weight other dtype":
        conv_weight = conv_weight.to(other_float(dtype))
    elif name == "conv_weight 3-d":
        conv_weight = conv_weight[:, None]
    elif name == "conv_weight channels":
        conv_weight = torch.cat([conv_weight, conv_weight[:1]])
    elif name == "conv_weight no tap":
        conv_weight = conv_weight[:, :0]
    elif name == "dilation 0":
        dilation = 0
    elif name == "dilation negative":
        dilation = -py.randint(1, 2**62)
    elif name == "eps negative":
        eps = -1.0
    elif name == "eps nan":
        eps = float("nan")
    elif name == "grad_out shape":
        grad_out = grad_out[:, :, :1] if g > 1 else grad_out.flatten(-2)
    elif name == "grad_out other dtype":
        grad_out = grad_out.to(other_float(dtype))
    if fault is None or fault.static:
        value, gate = float_layout(data, value, "value"), float_layout(data, gate, "gate")
        conv_weight, grad_out = float_layout(data, conv_weight, "conv_weight"), float_layout(data, grad_out, "grad_out")
    args = [value, gate, norm_weight, conv_weight, dilation, eps]
    names = ["value", "gate", "norm_weight", "conv_weight"]
    if backward:
        args, names = [grad_out, *args], ["grad_out", *names]
    if name is not None and name.endswith("on meta"):
        fault = move_one_to_meta(args, names, name.split()[0])

    # The reference pads (kernel_size-1)*dilation zeros: state a huge dilation as T+1, the same taps.
    ref_dilation = min(dilation, t + 1)
    run_layer_case(op, args, fault, dtype, backward,
                   lambda: float64_grads(ref.gated_short_conv, [value, gate, norm_weight, conv_weight], grad_out,
                                         ref_dilation, eps))


test_gated_short_conv, test_gated_short_conv_fault = valid_and_faulty(
    "gated_short_conv", lambda data, name: check_gated_short_conv(data, name, False), CONV_FAULTS, 40)
test_gated_short_conv_backward, test_gated_short_conv_backward_fault = valid_and_faulty(
    "gated_short_conv_backward", lambda data, name: check_gated_short_conv(data, name, True), CONV_BACKWARD_FAULTS, 40)


# --------------------------------------------------------------------------
# long sequences
# --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deepseek", "xxh64"])
def test_long_sequence_hash_and_lookup(family):
    gen = torch.Generator().manual_seed(5)
    t = 50_000 if family == "deepseek" else 3_000  # the xxh64 reference hashes token by token in Python
    vocab, n, heads = 1000, 3, 4
    ids = random_ints(gen, -2, vocab, (1, t))
    lookup = torch.randperm(vocab, generator=gen)
    sizes = torch.tensor([[1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049]])
    keys = random_ints(gen, INT64_MIN, INT64_MAX, (1, n))
    if family == "xxh64":
        keys = torch.tensor([[ref.xxh64_seed(0, 7, order) for order in (2, 3)]], dtype=torch.uint64).view(torch.int64)
    hashed = OPS.ngram_hash(ids, lookup, keys, sizes, None, 1, family)
    assert torch.equal(hashed, ngram_reference(ids, lookup, keys, sizes, None, 1, family, [7], 0))
    assert torch.equal(OPS.compress_ids(ids, lookup), torch.from_numpy(ref.compress_ids(ids.numpy(), lookup.numpy())))
    offsets = ref.head_offsets(sizes[0].tolist())
    weight = torch.randn(int(sizes.sum()), 16, generator=gen)
    assert torch.equal(OPS.multihead_embedding(weight, hashed[0], offsets, False),
                       ref.multihead_embedding(weight, hashed[0], offsets))
    grad = torch.randn(1, t, 8, 16, generator=gen)
    assert_scatter_sum_close(OPS.multihead_embedding_backward(grad, hashed[0], offsets, weight.shape[0]),
                             grad, hashed[0], offsets, weight.shape[0])


def test_long_sequence_layer_ops():
    gen = torch.Generator().manual_seed(6)
    t, g, d = 4096, 2, 64  # C = 128 channels: the conv kernel works in chunks of 1024 tokens
    f64 = torch.float64
    key, hidden = torch.randn(1, t, g, d, generator=gen, dtype=f64), torch.randn(1, t, g, d, generator=gen, dtype=f64)
    wk, wq = 1 + 0.3 * torch.randn(g, d, generator=gen, dtype=f64), 1 + 0.3 * torch.randn(g, d, generator=gen, dtype=f64)
    grad_gate = torch.randn(1, t, g, generator=gen, dtype=f64)
    truth_out, truth_grads = float64_grads(ref.context_gate, [key, hidden, wk, wq], grad_gate, None)
    assert_forward_close(OPS.context_gate(key, hidden, wk, wq, None), truth_out, f64)
    assert_backward_close(OPS.context_gate_backward(grad_gate, key, hidden, wk, wq, None), truth_grads, f64)
    value, gate = torch.randn(1, t, d, generator=gen, dtype=f64), torch.rand(1, t, g, generator=gen, dtype=f64)
    norm_weight = 1 + 0.3 * torch.randn(g, d, generator=gen, dtype=f64)
    conv_weight = torch.randn(g * d, 4, generator=gen, dtype=f64) / 4
    grad_out = torch.randn(1, t, g, d, generator=gen, dtype=f64)
    for dilation in (3, 1000):  # 1000: taps reaching across the token chunks of the CPU kernel
        args = (value, gate, norm_weight, conv_weight, dilation, 1e-5)
        truth_out, truth_grads = float64_grads(ref.gated_short_conv, list(args[:4]), grad_out, dilation, 1e-5)
        assert_forward_close(OPS.gated_short_conv(*args), truth_out, f64)
        assert_backward_close(OPS.gated_short_conv_backward(grad_out, *args), truth_grads, f64)
