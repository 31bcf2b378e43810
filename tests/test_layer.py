"""EngramLayer against the plain-PyTorch transcription of spec §3-6
(engram.reference.EngramLayerReference): forward and every gradient, reduced
precision, reference state_dicts, torch.compile, bad inputs.

Tolerances (defined in tests/test_layer_ops.py):
  float32      |ours - reference| <= 1e-5 + 1e-5 * |reference| + 2 * |reference - float64|
               elementwise: atol = rtol = 1e-5 wherever the float32 reference
               is itself accurate; only where float32 cannot resolve a value
               (a gate score near 0: the gate's gradient goes like 1/sqrt|s|)
               the reference's own error, twice, is allowed on top.
  bf16, fp16   per output and per gradient, the median over 16 draws of
               max |ours - float64| (in ulps at the tensor's magnitude) is at most
               2 x the reference's median + 1 ulp, the reference run in the same
               dtype and float64 the reference on the same rounded weights and inputs.
"""

import copy

import pytest
import torch
from torch import nn
from test_layer_ops import REDUCED_PRECISION_SEEDS, ReducedPrecisionErrors, assert_float32_matches

from engram import CompressionTable, EngramConfig, EngramLayer, NgramHasher
from engram.reference import EngramLayerReference

VOCAB = 500  # a small tokenizer vocabulary keeps the hash lookup tiny
LAYER_ID = 3
SPEC_KEYS = [
    "multi_head_embedding.offsets",
    "multi_head_embedding.embedding.weight",
    "short_conv.conv.weight",
    *[f"short_conv.norms.{g}.weight" for g in range(4)],
    "value_proj.weight",
    "value_proj.bias",
    *[k for g in range(4) for k in (f"key_projs.{g}.weight", f"key_projs.{g}.bias")],
    *[f"norm1.{g}.weight" for g in range(4)],
    *[f"norm2.{g}.weight" for g in range(4)],
]


def small_config(n=3, **changes):
    return EngramConfig(engram_vocab_size=[1000] * (n - 1), max_ngram_size=n, n_embed_per_ngram=32,
                        n_head_per_ngram=4, layer_ids=[1, LAYER_ID], **changes)


def make_layers(n=3, g=4, d=24, **changes):
    """EngramLayer and the reference with the same weights; the RMSNorm weights
    are moved off their initial ones so that their gradients matter."""
    cfg, table = small_config(n, **changes), CompressionTable.identity(VOCAB)
    ours = EngramLayer(cfg, LAYER_ID, d, hc_mult=g, compression=table)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    reference = EngramLayerReference(cfg, LAYER_ID, d, hc_mult=g, compression=table)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def make_inputs(b, t, g, d, dtype=torch.float32):
    shape = (b, t, d) if g == 1 else (b, t, g, d)
    return torch.randn(shape, dtype=dtype), torch.randint(0, VOCAB, (b, t)), torch.randn(shape, dtype=dtype)


def float64_truth(reference):
    """The reference in float64 with its gate RMSNorms keeping the epsilon of
    the dtype it ran in (eps=None means finfo(input dtype).eps, spec §5)."""
    truth = copy.deepcopy(reference)
    eps = torch.finfo(reference.value_proj.weight.dtype).eps
    for norm in (*truth.norm1, *truth.norm2):
        norm.eps = eps
    return truth.double()


def run(layer, hidden, ids, grad_out):
    """Output and {name: gradient} for the hidden states and every parameter."""
    hidden = hidden.detach().requires_grad_()
    names, params = zip(*((n.removeprefix("_orig_mod."), p) for n, p in layer.named_parameters()))  # compiled
    out = layer(hidden, ids)
    grads = torch.autograd.grad(out, [hidden, *params], grad_out)
    return {"output": out, "hidden_states": grads[0], **dict(zip(names, grads[1:]))}


# --------------------------------------------------------------------------
# equal to the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("b, t", [(1, 2), (1, 13), (2, 9)])  # t=2 is shorter than the conv's reach 3 * n
def test_forward_and_every_gradient_match_reference(g, n, b, t):
    ours, reference = make_layers(n=n, g=g)
    hidden, ids, grad_out = make_inputs(b, t, g, 24)
    got = run(ours, hidden, ids, grad_out)
    want = run(reference, hidden, ids, grad_out)
    truth = run(float64_truth(reference), hidden.double(), ids, grad_out.double())
    assert got.keys() == want.keys() and len(got) == 2 + 4 + 5 * g  # output, hidden, parameters
    assert got["output"].shape == hidden.shape
    for name in got:
        assert got[name].dtype == torch.float32 and got[name].layout == torch.strided, name
        assert_float32_matches(got[name], want[name], truth[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [1, 4])
def test_reduced_precision_within_twice_the_reference_error(dtype, g):
    errors = ReducedPrecisionErrors()
    for seed in REDUCED_PRECISION_SEEDS:
        torch.manual_seed(seed)
        ours, reference = make_layers(g=g)
        ours, reference = ours.to(dtype), reference.to(dtype)
        hidden, ids, grad_out = make_inputs(2, 16, g, 24, dtype)
        got = run(ours, hidden, ids, grad_out)
        want = run(reference, hidden, ids, grad_out)
        truth = run(float64_truth(reference), hidden.double(), ids, grad_out.double())
        for name in got:
            assert got[name].dtype == dtype, name
            errors.add(name, got[name], want[name], truth[name])
    errors.check()


def test_float32_table_with_bf16_activations():
    errors = ReducedPrecisionErrors()
    for seed in REDUCED_PRECISION_SEEDS:
        torch.manual_seed(seed)
        ours, reference = make_layers(g=4)
        for layer in (ours, reference):
            layer.to(torch.bfloat16).multi_head_embedding.embedding.float()
        hidden, ids, grad_out = make_inputs(1, 12, 4, 24, torch.bfloat16)
        got = run(ours, hidden, ids, grad_out)
        want = run(reference, hidden, ids, grad_out)
        truth = run(float64_truth(reference), hidden.double(), ids, grad_out.double())
        assert got["multi_head_embedding.embedding.weight"].dtype == torch.float32
        for name in got:
            errors.add(name, got[name], want[name], truth[name])
    errors.check()


def test_layer_gradcheck_float64():
    # Hidden states and the small weights (the table and projections are
    # covered against the reference above; gradcheck of 64k table entries is slow).
    ours, _ = make_layers(n=2, g=2, d=6)
    ours.double()
    hidden, ids, _ = make_inputs(1, 7, 2, 6, torch.float64)
    names = ["norm1.0.weight", "norm2.1.weight", "short_conv.norms.0.weight", "short_conv.conv.weight"]
    params = dict(ours.named_parameters())

    def fn(h, *weights):
        return torch.func.functional_call(ours, {**params, **dict(zip(names, weights))}, (h, ids))

    inputs = [hidden.requires_grad_(), *(params[n].detach().clone().requires_grad_() for n in names)]
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------
# state_dict, hashing, repr
# --------------------------------------------------------------------------


def test_reference_state_dict_loads_strict_and_gives_same_outputs():
    torch.manual_seed(1)
    _, reference = make_layers(g=4)
    torch.manual_seed(2)
    ours, _ = make_layers(g=4)
    assert list(ours.state_dict()) == SPEC_KEYS
    ours.load_state_dict(reference.state_dict(), strict=True)
    hidden, ids, grad_out = make_inputs(2, 10, 4, 24)
    got, want = run(ours, hidden, ids, grad_out), run(reference, hidden, ids, grad_out)
    truth = run(float64_truth(reference), hidden.double(), ids, grad_out.double())
    for name in got:
        assert_float32_matches(got[name], want[name], truth[name])


def test_default_initialisation_matches_reference():
    # Submodules are built in one order, so one seed gives one set of weights.
    cfg, table = small_config(), CompressionTable.identity(VOCAB)
    torch.manual_seed(5)
    ours = EngramLayer(cfg, LAYER_ID, 16, hc_mult=2, compression=table)
    torch.manual_seed(5)
    reference = EngramLayerReference(cfg, LAYER_ID, 16, hc_mult=2, compression=table)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_hash_buffers_are_not_state_and_keep_int64():
    ours, _ = make_layers(g=1)
    buffers = dict(ours.named_buffers())
    assert {"hash_lookup", "hash_keys", "hash_sizes"} <= buffers.keys()
    assert not any(k.startswith("hash_") for k in ours.state_dict())
    ours.to(torch.bfloat16)
    assert all(ours.get_buffer(k).dtype == torch.int64 for k in ("hash_lookup", "hash_keys", "hash_sizes"))


@pytest.mark.parametrize("family", ["deepseek", "xxh64"])
def test_hash_equals_hasher_and_numpy_reference(family):
    cfg, table = small_config(hash=family), CompressionTable.identity(VOCAB)
    ours = EngramLayer(cfg, LAYER_ID, 8, compression=table)
    ids = torch.randint(0, VOCAB, (2, 9))
    want = NgramHasher(cfg, table).hash(ids)[LAYER_ID]
    assert torch.equal(ours.hash(ids), want)
    for hashing in ("numpy", "op"):
        assert torch.equal(EngramLayerReference(cfg, LAYER_ID, 8, compression=table, hashing=hashing).hash(ids), want)


def test_extra_repr_states_rows_width_and_bytes():
    ours, _ = make_layers(g=2)
    w = ours.multi_head_embedding.embedding.weight
    text = repr(ours)
    assert f"rows={w.shape[0]:,}" in text and f"head_dim={w.shape[1]}" in text
    assert f"table_bytes={w.numel() * 4:,}" in text


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


class Block(nn.Module):
    """A residual block around an Engram layer, as a model would use it."""

    def __init__(self, engram: EngramLayer, d: int) -> None:
        super().__init__()
        self.engram = engram
        self.out = nn.Linear(d, d)

    def forward(self, hidden, ids):
        return self.out(hidden + self.engram(hidden, ids))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    block = Block(make_layers(g=4)[0], 24)
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)  # fullgraph: a graph break raises
    for t in (7, 11) if dynamic else (7,):
        hidden, ids, grad_out = make_inputs(2, t, 4, 24)
        got, want = run(compiled, hidden, ids, grad_out), run(block, hidden, ids, grad_out)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    ours, _ = make_layers(g=4)
    hidden, ids, _ = make_inputs(1, 5, 4, 24)
    with pytest.raises(ValueError, match=r"hidden_states has shape \[1, 5, 96\] but hc_mult=4"):
        ours(hidden.flatten(2), ids)
    with pytest.raises(ValueError, match=r"hidden_states has shape \[1, 5, 3, 24\]; expected \[B, T, 4, 24\]"):
        ours(hidden[:, :, :3], ids)
    with pytest.raises(ValueError, match=r"input_ids has shape \[1, 4\]; expected \[B, T\] = \[1, 5\]"):
        ours(hidden, ids[:, :4])
    with pytest.raises(TypeError, match=r"hidden_states is torch.float64 but the layer's weights are torch.float32"):
        ours(hidden.double(), ids)
    with pytest.raises(TypeError, match=r"ngram_hash: input_ids must be Long, got Int"):
        ours(hidden, ids.int())
    with pytest.raises(IndexError, match=rf"ngram_hash: input_ids holds {VOCAB} at flat index 2"):
        ours(hidden, torch.tensor([[1, 2, VOCAB, 3, 4]]))
    with pytest.raises(ValueError, match=r"layer_id=7 is not in config.layer_ids=\[1, 3\]"):
        EngramLayer(small_config(), 7, 24)


def test_public_gate_equals_spec_formula():
    # EngramLayer.gate: spec §5 from the layer's own submodules, in plain PyTorch.
    cfg = EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0])
    layer = EngramLayer(cfg, 0, hidden_size=32, hc_mult=3, compression=CompressionTable.identity(300))
    hidden, ids = torch.randn(2, 9, 3, 32), torch.randint(0, 300, (2, 9))
    e = torch.nn.functional.embedding(layer.hash(ids) + layer.multi_head_embedding.offsets,
                                      layer.multi_head_embedding.embedding.weight).reshape(2, 9, -1)
    want = []
    for g in range(3):
        key = layer.norm1[g](layer.key_projs[g](e))
        query = layer.norm2[g](hidden[:, :, g])
        s = (key * query).sum(-1) / 32**0.5
        want.append(torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt()))
    torch.testing.assert_close(layer.gate(hidden, ids), torch.stack(want, dim=2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="input_ids has shape"):
        layer.gate(hidden, ids[:, :4])
