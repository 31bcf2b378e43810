"""torch.export and AOTInductor packages of the tiny LM (engram/export.py).

One small model is exported and compiled once per module (the AOTInductor
compile dominates: ~15-60 s on 2 cores, see docs/export.md); its Engram
tables are made large (~38 MiB) so the size test means something."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import engram
import engram.export as ex

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from train_tiny_lm import TinyLM  # noqa: E402

VOCAB, D_MODEL, LAYERS, HEADS, MAX_LEN, MAX_BATCH = 64, 16, 2, 2, 32, 4
CONFIG = engram.EngramConfig(engram_vocab_size=[300007, 300007], max_ngram_size=3, n_embed_per_ngram=16,
                             n_head_per_ngram=2, layer_ids=[1], pad_id=2)
# float32 epsilon times 2^6 of the largest logit: the package computes the same
# ops, but Inductor's fused kernels (RMSNorm, softmax, GEMM epilogues) add in
# another order, which moves each result by a few eps of the largest value it
# sums (measured: <= 5 eps); 64 eps leaves room for other ISAs and thread counts.
REL_TOL = 64 * torch.finfo(torch.float32).eps


def build(placement="device", table_dir=None) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(VOCAB, D_MODEL, LAYERS, HEADS, MAX_LEN)
    torch.manual_seed(1)
    model.add_engram(CONFIG, engram.CompressionTable.identity(VOCAB), init="reference",
                     table_placement=placement, table_dir=table_dir)
    return model.eval()


def assert_close_to_eager(actual, expected):
    tol = REL_TOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def ids(b, t, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def program(model):
    return ex.export(model, ids(2, 8), max_batch=MAX_BATCH, max_seq=MAX_LEN)


@pytest.fixture(scope="module")
def package(program, model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pkg") / "tiny.pt2")
    return ex.load_package(ex.compile_package(program, path, model))


@pytest.mark.parametrize("b,t", [(1, 1), (3, 7), (MAX_BATCH, MAX_LEN)])
def test_exported_program_equals_eager(model, program, b, t):
    x = ids(b, t, seed=b * 100 + t)
    tables = ex.table_tensors(model)
    with torch.no_grad():
        assert torch.equal(program.module()(x, tables), model(x))


def test_tables_are_not_in_the_program(model, program):
    names = set(ex.table_names(model))
    assert names and not names & {k.removeprefix("model.") for k in program.state_dict}
    assert not any(v.numel() >= t.numel() for v in program.state_dict.values() for t in ex.table_tensors(model))
    assert model.blocks[1].engram.multi_head_embedding.embedding.weight is not None  # put back after export


@pytest.mark.parametrize("b,t", [(1, 1), (3, 7), (MAX_BATCH, MAX_LEN)])
def test_package_equals_eager(model, package, b, t):
    x = ids(b, t, seed=b * 100 + t)
    with torch.no_grad():
        assert_close_to_eager(package(x, ex.table_tensors(model)), model(x))


def test_package_greedy_tokens_equal_eager(model, package):
    prompt = ids(2, 4, seed=7)
    tables = ex.table_tensors(model)
    eager = ex.greedy_decode(model, prompt, 12)
    packaged = ex.greedy_decode(lambda x: package(x, tables), prompt, 12)
    assert torch.equal(packaged, eager)


def test_package_far_smaller_than_tables(model, package):
    table_bytes = ex.table_bytes(ex.table_tensors(model))
    assert table_bytes > 30 * 2**20
    assert os.path.getsize(package.path) < table_bytes / 10


def test_tables_are_runtime_inputs(model, package):
    x = ids(2, 9, seed=3)
    tables = ex.table_tensors(model)
    changed = tuple(t.flip(0) * 0.5 for t in tables)  # other rows at other scale
    with torch.no_grad():
        before = package(x, tables)
        after = package(x, changed)
        eager_changed = torch.func.functional_call(model, dict(zip(ex.table_names(model), changed)), (x,))
    assert (after - before).abs().max() > 1e-3
    assert_close_to_eager(after, eager_changed)


def test_package_checks_tables(model, package):
    tables = ex.table_tensors(model)
    x = ids(1, 3)
    with pytest.raises(ValueError, match=r"takes 1 Engram tables .*got 2"):
        package(x, tables * 2)
    with pytest.raises(ValueError, match=r"tables\[0\] is a float32 table of shape \[\d+, 8\].*exported with"):
        package(x, (tables[0][:-1],))
    with pytest.raises(ValueError, match=r"tables\[0\] is a float64 table"):
        package(x, (tables[0].double(),))


def test_package_refuses_input_ids_beyond_its_export_bounds(model, package):
    tables = ex.table_tensors(model)
    assert package.max_input == {"max_batch": MAX_BATCH, "max_seq": MAX_LEN}
    for shape in ((MAX_BATCH + 1, 4), (1, MAX_LEN + 1)):
        with pytest.raises(ValueError, match=rf"input_ids of shape \[{shape[0]}, {shape[1]}\].*takes up to "
                                             rf"\[{MAX_BATCH}, {MAX_LEN}\]"):
            package(ids(*shape), tables)


def test_package_of_another_op_library_version_is_refused(package):
    meta = package.runner.get_metadata()
    assert meta[ex.METADATA_OPS_ABI] == str(engram._loader.OPS_ABI_VERSION)
    assert ex.check_metadata(dict(meta), "p.pt2") == package.tables
    with pytest.raises(ValueError, match=r"'p.pt2' was exported for op library ABI version 999 .*has version "
                                         + str(engram._loader.OPS_ABI_VERSION)):
        ex.check_metadata({**meta, ex.METADATA_OPS_ABI: "999"}, "p.pt2")
    without = {k: v for k, v in meta.items() if k != ex.METADATA_OPS_ABI}
    with pytest.raises(ValueError, match=r"exported for no op library ABI version"):
        ex.check_metadata(without, "p.pt2")
    with pytest.raises(ValueError, match=r"is not a package of engram.export.compile_package format"):
        ex.check_metadata({}, "p.pt2")


@pytest.mark.parametrize("placement", ["host", "mmap"])
def test_host_and_mmap_tables_export(placement, model, package, tmp_path):
    other = build(placement, str(tmp_path) if placement == "mmap" else None)
    weight = other.blocks[1].engram.multi_head_embedding.embedding.weight
    assert torch.equal(weight, model.blocks[1].engram.multi_head_embedding.embedding.weight)  # same seeds
    program = ex.export(other, ids(2, 8), max_batch=MAX_BATCH, max_seq=MAX_LEN)
    assert not any(k.endswith("embedding.weight") and "engram" in k for k in program.state_dict)
    x = ids(3, 5, seed=11)
    tables = ex.table_tensors(other)
    if placement == "mmap":  # the file's memory, passed without a copy
        assert tables[0].data_ptr() == other.blocks[1].engram.multi_head_embedding._file_array.ctypes.data
    with torch.no_grad():
        eager = other(x)
        assert torch.equal(program.module()(x, tables), eager)
        # The package does not depend on where the table lives.
        assert_close_to_eager(package(x, tables), eager)


def test_layer_on_another_device_than_its_host_table_is_refused():
    model = build("host").to("meta")  # the host table stays in CPU memory, the layer moves
    with pytest.raises(ValueError, match=r"table_placement='host' on cpu while its layer is on meta.*model\.to"):
        ex.export(model, ids(1, 4), max_batch=MAX_BATCH, max_seq=MAX_LEN)


def test_prefetcher_is_refused():
    model = build("host")
    with engram.Prefetcher(model):
        with pytest.raises(ValueError, match=r"table_placement='host'.*Prefetcher attached.*close"):
            ex.export(model, ids(1, 4), max_batch=MAX_BATCH, max_seq=MAX_LEN)
    ex.check_exportable(model)  # closed: exportable again


def test_model_without_engram_is_refused():
    with pytest.raises(ValueError, match="holds no Engram table"):
        ex.export(TinyLM(VOCAB, D_MODEL, 1, HEADS, MAX_LEN), ids(1, 4), max_batch=MAX_BATCH, max_seq=MAX_LEN)


@pytest.mark.parametrize("kw,msg", [({"max_batch": 1}, "max_batch=1"), ({"max_seq": "8"}, "max_seq='8'")])
def test_bad_export_arguments(model, kw, msg):
    args = {"max_batch": MAX_BATCH, "max_seq": MAX_LEN, **kw}
    with pytest.raises(ValueError, match=msg):
        ex.export(model, ids(1, 4), **args)


def test_hugging_face_decoder_with_engram_exports_with_dynamic_shapes():
    """A transformers Llama with engram.integrations' layers goes through
    engram.export (the block hooks keep no KV-cache tail while exporting) and
    the exported program equals eager at sizes other than the example's."""
    pytest.importorskip("transformers", reason="transformers is not installed (the [test] extra has it)")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from export_hf_decoder import CausalLMLogits, build_model, parse_args

    model = CausalLMLogits(build_model(parse_args(["--out", "unused"])))
    program = ex.export(model, ids(2, 8), max_batch=MAX_BATCH, max_seq=MAX_LEN)
    tables = ex.table_tensors(model)
    assert len(tables) == len(ex.table_names(model)) >= 1
    with torch.no_grad():
        for b, t in ((1, 3), (3, 11)):
            x = ids(b, t, seed=t)
            assert torch.equal(program.module()(x, tables), model(x))
