"""The argument checks of csrc/library.cpp, in Python, for the kernels that run
without them: the fake kernels (meta tensors, torch.compile tracing, and any
call that mixes the meta device with another one).

Same order, same exception types, same messages as the C++ checks, so a bad
argument reads the same whichever kernel runs. Checks that need the values
(ids in range, head sizes >= 1) stay with the real kernels. Sizes may be
symbolic: comparisons go through torch._check_* so that they become guards.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

MAX_NGRAM_SIZE = 16  # kMaxNgramSize in kernels/hash.h
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MAX = 2**63 - 1


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: torch.dtype) -> str:
    """ATen's name of a dtype ("Long", "Float", "BFloat16"), as the C++ checks print it."""
    name = torch.empty(0, dtype=dtype, device="meta").type()  # "torch.meta.LongTensor"
    return name.rsplit(".", 1)[-1][: -len("Tensor")]


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def check_dtype(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype_name(dtype)}, got {dtype_name(t.dtype)}")


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {_shape(t)}")


def check_nonempty(op: str, name: str, t: torch.Tensor) -> None:
    torch._check_value(t.numel() > 0, lambda: f"{op}: {name} is empty (shape {_shape(t)}); expected at least one element")


def check_same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: Optional[torch.Tensor]) -> None:
    if b is not None and a.device != b.device:
        raise RuntimeError(f"{op}: {name_b} is on {b.device} but {name_a} is on {a.device}; expected both on the same device")


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor, got {dtype_name(t.dtype)}; "
            "expected Half, BFloat16, Float or Double"
        )


def _check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence, expected_text: str) -> None:
    expected = list(expected)
    ok = t.dim() == len(expected) and all(a == b for a, b in zip(t.shape, expected))
    torch._check_value(ok, lambda: f"{op}: {name} has shape {_shape(t)}; expected {expected_text} = {expected}")


# --------------------------------------------------------------------------
# hash and embedding ops
# --------------------------------------------------------------------------


def compress_args(input_ids: torch.Tensor, lookup: torch.Tensor) -> None:
    op = "compress_ids"
    check_dtype(op, "input_ids", input_ids, torch.int64)
    check_nonempty(op, "input_ids", input_ids)
    check_dtype(op, "lookup", lookup, torch.int64)
    check_dim(op, "lookup", lookup, 1)
    check_nonempty(op, "lookup", lookup)
    check_same_device(op, "input_ids", input_ids, "lookup", lookup)


def ngram_hash_args(input_ids, lookup, keys, head_sizes, offsets, pad_id: int, family: str) -> tuple:
    """-> the output shape [L, B, T, K]."""
    op = "ngram_hash"
    if family not in ("deepseek", "xxh64"):
        raise ValueError(f"{op}: family must be 'deepseek' or 'xxh64', got '{family}'")
    check_dtype(op, "input_ids", input_ids, torch.int64)
    check_dim(op, "input_ids", input_ids, 2)
    torch._check_value(
        input_ids.shape[0] > 0 and input_ids.shape[1] > 0,
        lambda: f"{op}: input_ids has shape {_shape(input_ids)}; expected [B, T] with B >= 1 sequences of T >= 1 tokens",
    )
    check_dtype(op, "lookup", lookup, torch.int64)
    check_dim(op, "lookup", lookup, 1)
    check_nonempty(op, "lookup", lookup)
    check_dtype(op, "keys", keys, torch.int64)
    check_dim(op, "keys", keys, 2)
    check_dtype(op, "head_sizes", head_sizes, torch.int64)
    check_dim(op, "head_sizes", head_sizes, 2)
    for name, t in (("lookup", lookup), ("keys", keys), ("head_sizes", head_sizes)):
        check_same_device(op, "input_ids", input_ids, name, t)
    num_layers = keys.shape[0]
    torch._check_value(num_layers >= 1, lambda: f"{op}: keys has shape {_shape(keys)}; expected at least one layer")
    n = keys.shape[1] if family == "deepseek" else keys.shape[1] + 1
    torch._check_value(
        2 <= n <= MAX_NGRAM_SIZE,
        lambda: f"{op}: keys has shape {_shape(keys)}, i.e. max n-gram order {n} for family '{family}'; "
        f"expected an order in [2, {MAX_NGRAM_SIZE}]",
    )
    torch._check_value(
        head_sizes.shape[0] == num_layers,
        lambda: f"{op}: head_sizes has shape {_shape(head_sizes)}; expected {num_layers} rows, one per layer of keys",
    )
    k = head_sizes.shape[1]
    torch._check_value(
        k > 0 and k % (n - 1) == 0,
        lambda: f"{op}: head_sizes has shape {_shape(head_sizes)}; expected K = (N-1)*H columns with N-1 = {n - 1}",
    )
    if offsets is not None:
        check_dtype(op, "offsets", offsets, torch.int64)
        check_same_device(op, "input_ids", input_ids, "offsets", offsets)
        _check_shape(op, "offsets", offsets, head_sizes.shape, "the shape of head_sizes")
    torch._check_index(
        0 <= pad_id < lookup.shape[0],
        lambda: f"{op}: pad_id={pad_id} is outside the tokenizer vocabulary [0, {lookup.shape[0]})",
    )
    return (num_layers, input_ids.shape[0], input_ids.shape[1], k)


def embedding_args(op: str, rows_like: torch.Tensor, rows_name: str, ids: torch.Tensor, offsets) -> None:
    check_floating(op, rows_name, rows_like)
    torch._check_value(
        rows_like.dim() >= 1 and rows_like.shape[-1] >= 1,
        lambda: f"{op}: {rows_name} has shape {_shape(rows_like)}; expected rows of Dh >= 1 values in its last dim",
    )
    check_dtype(op, "ids", ids, torch.int64)
    if ids.dim() < 1:
        raise ValueError(f"{op}: ids must be [..., K], got a 0-dim tensor")
    check_nonempty(op, "ids", ids)
    check_same_device(op, rows_name, rows_like, "ids", ids)
    if offsets is not None:
        check_dtype(op, "offsets", offsets, torch.int64)
        check_dim(op, "offsets", offsets, 1)
        check_same_device(op, "ids", ids, "offsets", offsets)
        torch._check_value(
            offsets.shape[0] == ids.shape[-1],
            lambda: f"{op}: offsets has {offsets.shape[0]} entries but ids has K={ids.shape[-1]} heads "
            f"in its last dim {_shape(ids)}",
        )


def multihead_embedding_args(weight, ids, offsets) -> None:
    op = "multihead_embedding"
    embedding_args(op, weight, "weight", ids, offsets)
    check_dim(op, "weight", weight, 2)


def multihead_embedding_backward_args(grad, ids, offsets, num_rows) -> None:
    op = "multihead_embedding_backward"
    embedding_args(op, grad, "grad", ids, offsets)
    ok = grad.dim() == ids.dim() + 1 and all(a == b for a, b in zip(grad.shape, ids.shape))
    torch._check_value(
        ok, lambda: f"{op}: grad has shape {_shape(grad)}; expected ids.shape + [Dh] with ids.shape {_shape(ids)}"
    )
    torch._check_value(num_rows >= 1, lambda: f"{op}: num_rows={num_rows}; expected >= 1")
    torch._check_value(
        num_rows * grad.shape[-1] * grad.element_size() <= INT64_MAX,
        lambda: f"{op}: num_rows={num_rows} with rows of Dh={grad.shape[-1]} {dtype_name(grad.dtype)} values "
        "needs more than 2^63 bytes",
    )


def gather_rows_args(table, rows) -> None:
    op = "gather_rows"
    check_dim(op, "table", table, 2)
    torch._check_value(
        table.is_contiguous(),
        lambda: f"{op}: table must be contiguous (row-major [R, Dh]), got strides {list(table.stride())}",
    )
    check_dtype(op, "rows", rows, torch.int64)


# --------------------------------------------------------------------------
# layer ops
# --------------------------------------------------------------------------


def _same_floating_dtype(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    check_same_device(op, ref_name, ref, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} is {dtype_name(t.dtype)} but {ref_name} is {dtype_name(ref.dtype)}; "
            "expected one floating dtype for all of them"
        )


def _check_eps(op: str, eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps={eps}; expected a finite value >= 0")


def context_gate_args(op: str, key, hidden, key_norm_weight, hidden_norm_weight, eps) -> tuple:
    """-> (B, T, G, D)."""
    check_floating(op, "key", key)
    check_dim(op, "key", key, 4)
    check_nonempty(op, "key", key)
    b, t, g, d = key.shape
    _same_floating_dtype(op, "key", key, "hidden", hidden)
    _check_shape(op, "hidden", hidden, key.shape, "the shape of key [B, T, G, D]")
    _same_floating_dtype(op, "key", key, "key_norm_weight", key_norm_weight)
    _check_shape(op, "key_norm_weight", key_norm_weight, (g, d), "[G, D]")
    _same_floating_dtype(op, "key", key, "hidden_norm_weight", hidden_norm_weight)
    _check_shape(op, "hidden_norm_weight", hidden_norm_weight, (g, d), "[G, D]")
    if eps is not None:
        _check_eps(op, eps)
    return b, t, g, d


def gated_short_conv_args(op: str, value, gate, norm_weight, conv_weight, dilation: int, eps: float) -> tuple:
    """-> (B, T, G, D, kernel_size)."""
    check_floating(op, "value", value)
    check_dim(op, "value", value, 3)
    check_nonempty(op, "value", value)
    b, t, d = value.shape
    _same_floating_dtype(op, "value", value, "gate", gate)
    check_dim(op, "gate", gate, 3)
    torch._check_value(
        gate.shape[0] == b and gate.shape[1] == t and gate.shape[2] >= 1,
        lambda: f"{op}: gate has shape {_shape(gate)}; expected [B, T, G] with [B, T] = [{b}, {t}] from value and G >= 1",
    )
    g = gate.shape[2]
    _same_floating_dtype(op, "value", value, "norm_weight", norm_weight)
    _check_shape(op, "norm_weight", norm_weight, (g, d), "[G, D]")
    _same_floating_dtype(op, "value", value, "conv_weight", conv_weight)
    check_dim(op, "conv_weight", conv_weight, 2)
    torch._check_value(
        conv_weight.shape[0] == g * d and conv_weight.shape[1] >= 1,
        lambda: f"{op}: conv_weight has shape {_shape(conv_weight)}; expected [G*D, kernel_size] = "
        f"[{g * d}, kernel_size >= 1]",
    )
    if dilation < 1:
        raise ValueError(f"{op}: dilation={dilation}; expected >= 1")
    _check_eps(op, eps)
    return b, t, g, d, conv_weight.shape[1]


def grad_like_args(op: str, name: str, grad: torch.Tensor, like: torch.Tensor, expected: Sequence) -> None:
    _same_floating_dtype(op, "the input", like, name, grad)
    _check_shape(op, name, grad, expected, "the shape of the forward output")
