"""Fixtures of the C++ API tests (tests/cpp_api/test_cpp_api.cpp).

python3 tests/cpp_api/make_fixtures.py DIR writes into DIR:
  - one save_layer file per (layer config, dtype): small layers of odd sizes
    with random weights from a fixed seed;
  - broken files (corrupted, or not matching the layer) for the loader's errors;
  - cases.pt, read by the test with torch::pickle_load: per layer the inputs,
    the Python outputs, hash ids and hash parameters, the state_dict names and
    shapes, and the messages Python raises for bad calls and bad files.
With --bench it also writes bench.pt (a layer of typical size, its inputs and
output) and times the Python eager forward of that layer; --time-python times
it again (the machine may be shared: the script alternates Python and C++).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

# The installed engram (pip install -e .): the one whose library and
# headers scripts/cpp_api_tests.sh builds the C++ test against.
import engram
from engram import CompressionTable, EngramConfig, EngramLayer
from engram import cpp_io

# (name, config, layer_id, hidden_size, hc_mult, compression, batch, seq_len)
def layer_specs():
    gen = torch.Generator().manual_seed(7)
    # A tokenizer map: 97 token ids onto 40 canonical ids (every one used).
    tokenizer = torch.cat([torch.arange(40), torch.randint(0, 40, (57,), generator=gen)])
    tokenizer = tokenizer[torch.randperm(97, generator=gen)]
    # Canonical ids near 3e9: V' > 2^31, so numpy draws the multipliers from
    # 32-bit words (the other branch of its bounded integers).
    huge = torch.tensor([0, 5, 3_000_000_000, 17, 2_999_999_999, 11, 4, 8], dtype=torch.int64)
    return [
        ("deepseek_n3_g1", EngramConfig(engram_vocab_size=[31, 37], max_ngram_size=3, n_embed_per_ngram=12,
                                        n_head_per_ngram=3, layer_ids=[0, 3], pad_id=2, seed=5, kernel_size=4),
         3, 7, 1, CompressionTable.identity(61), 2, 11),
        ("xxh64_n4_g3_tokenizer", EngramConfig(engram_vocab_size=[23, 29, 41], max_ngram_size=4, n_embed_per_ngram=10,
                                               n_head_per_ngram=2, layer_ids=[2], pad_id=5, seed=123456789,
                                               kernel_size=3, hash="xxh64"),
         2, 9, 3, CompressionTable(tokenizer), 3, 13),
        ("deepseek_n2_g2_bigvocab", EngramConfig(engram_vocab_size=[19], max_ngram_size=2, n_embed_per_ngram=6,
                                                 n_head_per_ngram=1, layer_ids=[4, 1, 9], pad_id=1, seed=2**40 + 3,
                                                 kernel_size=1),
         9, 5, 2, CompressionTable(huge), 1, 7),
    ]


def randomize(layer: EngramLayer, seed: int) -> None:
    """Random weights from a fixed seed: norm weights near 1, the rest near PyTorch's scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif p.dim() == 2 and "embedding" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise * 0.5)


def message(fn):
    """(exception class name, message) of what fn() raises."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - any error is the expected outcome
        return type(err).__name__, str(err.args[0]) if err.args else str(err)
    raise AssertionError("expected an error")


def forward_errors(layer: EngramLayer, hidden: torch.Tensor, ids: torch.Tensor, vocab: int):
    """Bad calls: (name, hidden, input_ids) -> Python's error."""
    bad_id = ids.clone()
    bad_id[-1, ids.shape[1] // 2] = vocab  # one id past the tokenizer vocabulary
    wide = torch.cat([hidden, hidden[..., :1]], dim=-1)  # hidden size D + 1
    other = torch.float64 if hidden.dtype == torch.float32 else torch.float32
    calls = [
        ("id_out_of_range", hidden, bad_id),
        ("wrong_hidden_size", wide, ids),
        ("input_ids_shape", hidden, ids[:, :-1].contiguous()),
        ("input_ids_dtype", hidden, ids.to(torch.int32)),
        ("hidden_dtype", hidden.to(other), ids),
    ]
    if layer.hc_mult > 1:
        calls.append(("three_dims_with_branches", hidden[:, :, 0].contiguous(), ids))
    out = []
    for name, h, i in calls:
        kind, text = message(lambda: layer(h, i))
        out.append({"name": name, "hidden": h, "input_ids": i, "type": kind, "message": text})
    return out


def broken_files(directory: str, good_path: str):
    """Files the loader must refuse: (name, path, exact) -> Python's error.
    exact=False: the message ends in the archive reader's own words, which
    differ between torch.load and torch::pickle_load; the test compares the
    part before them."""
    good = torch.load(good_path, weights_only=True)
    raw = open(good_path, "rb").read()

    def variant(name, edit):
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        edit(data)
        path = os.path.join(directory, f"bad_{name}.pt")
        torch.save(data, path)
        return path

    def raw_file(name, content):
        path = os.path.join(directory, f"bad_{name}.pt")
        with open(path, "wb") as f:
            f.write(content)
        return path

    state = good["state_dict"]
    rows, cols = state["value_proj.weight"].shape
    files = [
        ("missing_file", os.path.join(directory, "no_such_layer.pt"), True),
        ("truncated", raw_file("truncated", raw[: len(raw) // 2]), False),
        ("garbage", raw_file("garbage", bytes(range(256)) * 4), False),
        ("not_a_dict", None, True),
        ("no_format", variant("no_format", lambda d: d.pop("format")), True),
        ("format_2", variant("format_2", lambda d: d.update(format=2)), True),
        ("format_str", variant("format_str", lambda d: d.update(format="1")), True),
        ("extra_entry", variant("extra_entry", lambda d: d.update(optimizer={})), True),
        ("no_state_dict", variant("no_state_dict", lambda d: d.pop("state_dict")), True),
        ("config_missing_field", variant("config_missing_field", lambda d: d["config"].pop("seed")), True),
        ("config_extra_field", variant("config_extra_field", lambda d: d["config"].update(rope=1)), True),
        ("config_wrong_type", variant("config_wrong_type", lambda d: d["config"].update(seed="5")), True),
        ("config_list_type", variant("config_list_type", lambda d: d["config"].update(layer_ids=[0, "3"])), True),
        ("config_invalid", variant("config_invalid", lambda d: d["config"].update(max_ngram_size=1)), True),
        ("config_hash", variant("config_hash", lambda d: d["config"].update(hash="murmur")), True),
        ("layer_not_configured", variant("layer_not_configured", lambda d: d["layer"].update(layer_id=99)), True),
        ("hidden_size_zero", variant("hidden_size_zero", lambda d: d["layer"].update(hidden_size=0)), True),
        ("placement_host", variant("placement_host", lambda d: d["layer"].update(table_placement="host")), True),
        ("compression_int32", variant("compression_int32", lambda d: d.update(compression=d["compression"].int())),
         True),
        ("pad_outside_vocab", variant("pad_outside_vocab", lambda d: d.update(compression=torch.arange(2))), True),
        ("compression_not_tensor", variant("compression_not_tensor", lambda d: d.update(compression=[0, 1])), True),
        ("state_missing_key", variant("state_missing_key", lambda d: d["state_dict"].pop("value_proj.bias")), True),
        ("state_extra_key",
         variant("state_extra_key", lambda d: d["state_dict"].update({"gate.weight": torch.ones(3)})), True),
        ("state_not_tensor", variant("state_not_tensor", lambda d: d["state_dict"].update({"norm1.0.weight": 1.0})),
         True),
        ("state_wrong_shape", variant("state_wrong_shape", lambda d: d["state_dict"].update(
            {"value_proj.weight": torch.zeros(rows, cols + 1)})), True),
        ("state_int_weight", variant("state_int_weight", lambda d: d["state_dict"].update(
            {"norm2.0.weight": torch.ones(state["norm2.0.weight"].shape, dtype=torch.int64)})), True),
        ("state_float_offsets", variant("state_float_offsets", lambda d: d["state_dict"].update(
            {"multi_head_embedding.offsets": state["multi_head_embedding.offsets"].float()})), True),
    ]
    out = []
    for name, path, exact in files:
        if name == "not_a_dict":
            path = os.path.join(directory, "bad_not_a_dict.pt")
            torch.save([1, 2, 3], path)
        kind, text = message(lambda: cpp_io.load_layer(path))
        if not exact:
            text = text[: text.index(" (") + 2]  # "load_layer: cannot read '...' as a torch.save archive ("
        out.append({"name": name, "path": path, "type": kind, "message": text, "exact": exact})
    return out


def constructor_errors():
    """Layers that cannot be built: (config fields, layer_id, hidden_size,
    hc_mult, identity vocabulary) -> Python's error, from EngramConfig or EngramLayer."""
    base = dict(engram_vocab_size=[31, 37], n_embed_per_ngram=12, n_head_per_ngram=3, layer_ids=[1, 15])
    specs = [
        ("layer_not_configured", {}, 7, 8, 1, 50),
        ("hidden_size_zero", {}, 1, 0, 1, 50),
        ("hc_mult_zero", {}, 1, 8, 0, 50),
        ("heads_do_not_divide", {"n_head_per_ngram": 5}, 1, 8, 1, 50),
        ("vocab_sizes_per_order", {"engram_vocab_size": [31]}, 1, 8, 1, 50),
        ("vocab_size_one", {"engram_vocab_size": [31, 1]}, 1, 8, 1, 50),
        ("max_ngram_size_one", {"max_ngram_size": 1}, 1, 8, 1, 50),
        ("no_layers", {"layer_ids": []}, 1, 8, 1, 50),
        ("negative_layer", {"layer_ids": [1, -2]}, 1, 8, 1, 50),
        ("duplicate_layers", {"layer_ids": [1, 15, 1]}, 1, 8, 1, 50),
        ("negative_pad", {"pad_id": -1}, 1, 8, 1, 50),
        ("negative_seed", {"seed": -3}, 1, 8, 1, 50),
        ("kernel_size_zero", {"kernel_size": 0}, 1, 8, 1, 50),
        ("embed_zero", {"n_embed_per_ngram": 0}, 1, 8, 1, 50),
        ("hash_family", {"hash": "it's"}, 1, 8, 1, 50),
        ("pad_outside_vocab", {"pad_id": 60}, 1, 8, 1, 50),
    ]
    out = []
    for name, changes, layer_id, hidden_size, hc_mult, vocab in specs:
        fields = {**dataclasses.asdict(EngramConfig()), **base, **changes}
        kind, text = message(lambda: EngramLayer(EngramConfig(**fields), layer_id, hidden_size, hc_mult,
                                                 CompressionTable.identity(vocab)))
        out.append({"name": name, "config": cpp_io.pickle_safe(fields), "layer_id": layer_id,
                    "hidden_size": hidden_size, "hc_mult": hc_mult, "vocab_size": vocab, "type": kind, "message": text})
    return out


def layer_case(directory, name, config, layer_id, hidden_size, hc_mult, compression, batch, seq_len, dtype, seed):
    torch.manual_seed(seed)
    layer = EngramLayer(config, layer_id, hidden_size, hc_mult, compression)
    randomize(layer, seed)
    layer = layer.to(dtype)
    path = os.path.join(directory, f"{name}_{str(dtype).split('.')[-1]}.pt")
    cpp_io.save_layer(layer, path)

    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, compression.vocab_size, (batch, seq_len), generator=gen)
    ids[0, :2] = config.pad_id
    shape = (batch, seq_len, hidden_size) if hc_mult == 1 else (batch, seq_len, hc_mult, hidden_size)
    hidden = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = layer(hidden, ids)
        gate = layer.gate(hidden, ids)
        reloaded = cpp_io.load_layer(path)
        assert torch.equal(reloaded(hidden, ids), out), f"{name}: the Python reader changed the layer"
    hasher = layer.hasher
    state = layer.state_dict()
    return layer, {
        "name": f"{name}_{str(dtype).split('.')[-1]}",
        "path": path,
        "dtype": str(dtype),
        "config": cpp_io.pickle_safe(dataclasses.asdict(config)),
        "layer_id": layer_id,
        "hidden_size": hidden_size,
        "hc_mult": hc_mult,
        "compression": compression.lookup.clone(),
        "hidden": hidden,
        "input_ids": ids,
        "output": out,
        "gate": gate,
        "hash_ids": layer.hash(ids),
        "hasher_ids": hasher.hash_stacked(ids),
        "hasher_rows": hasher.hash_stacked(ids, with_offsets=True),
        "multipliers": torch.stack([hasher.multipliers(l) for l in config.layer_ids]),
        "xxh64_seeds": torch.stack([hasher.xxh64_seeds(l) for l in config.layer_ids]),
        "head_sizes": torch.tensor([hasher.head_sizes(l) for l in config.layer_ids]),
        "offsets": torch.stack([hasher.offsets(l) for l in config.layer_ids]),
        "state_names": list(state),
        "state_shapes": [list(v.shape) for v in state.values()],
        "state_dtypes": [str(v.dtype) for v in state.values()],
        "forward_errors": forward_errors(layer, hidden, ids, compression.vocab_size),
        "hasher_error": dict(zip(("type", "message"), message(lambda: hasher.hash_stacked(ids, layer_ids=[77])))),
    }


def time_forward(layer, hidden, ids, repeats: int):
    """(min, median) seconds of layer(hidden, ids) in inference mode, after 3 warm-up calls."""
    with torch.inference_mode():
        for _ in range(3):
            layer(hidden, ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(hidden, ids)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def time_python(directory: str, repeats: int) -> None:
    """Times the Python eager forward of the saved bench layer (read back with
    cpp_io.load_layer, as C++ reads it) and records it in bench.pt."""
    path = os.path.join(directory, "bench.pt")
    bench = torch.load(path, weights_only=True)
    layer = cpp_io.load_layer(bench["layer"])
    low, median = time_forward(layer, bench["hidden"], bench["input_ids"], repeats)
    bench["python_min_s"], bench["python_median_s"] = low, median
    torch.save(bench, path)
    print(f"Python eager forward: min {low * 1e3:.2f} ms, median {median * 1e3:.2f} ms over {repeats} runs, "
          f"{torch.get_num_threads()} threads")


def bench_fixture(directory: str) -> None:
    """A layer of typical size (E=512, H=8, N=3, D=1024, G=4; a smaller table
    than the reference's, which does not change the work per token), B=2, T=64."""
    config = EngramConfig(engram_vocab_size=[20011, 20011])
    torch.manual_seed(0)
    layer = EngramLayer(config, 1, 1024, 4, CompressionTable.identity(engram.layer.DEFAULT_VOCAB_SIZE))
    path = os.path.join(directory, "bench_layer.pt")
    cpp_io.save_layer(layer, path)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, engram.layer.DEFAULT_VOCAB_SIZE, (2, 64), generator=gen)
    hidden = torch.randn(2, 64, 4, 1024, generator=gen)
    with torch.inference_mode():
        out = layer(hidden, ids)
    torch.save({"layer": path, "hidden": hidden, "input_ids": ids, "output": out}, os.path.join(directory, "bench.pt"))
    print("bench layer: B=2, T=64, hidden 1024, hc_mult 4, E=512, H=8, N=3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--bench", action="store_true", help="also write the timing fixture and time Python")
    parser.add_argument("--time-python", action="store_true",
                        help="only time the Python forward of the bench layer already in DIR")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    directory = os.path.abspath(args.directory)
    if args.time_python:
        time_python(directory, args.repeats)
        return
    os.makedirs(directory, exist_ok=True)
    cases, first = [], None
    for i, (name, config, layer_id, hidden_size, hc_mult, compression, batch, seq_len) in enumerate(layer_specs()):
        for dtype in (torch.float32, torch.float64):
            _, case = layer_case(directory, name, config, layer_id, hidden_size, hc_mult, compression, batch, seq_len,
                                 dtype, seed=100 + i)
            # The float64 file is the float32 layer converted: the test also
            # converts the float32 layer in C++ and expects the same outputs.
            case["float32_path"] = cases[-1]["path"] if dtype == torch.float64 else ""
            cases.append(case)
            first = first or case["path"]
    torch.save(
        {"cases": cases, "file_errors": broken_files(directory, first), "constructor_errors": constructor_errors(),
         "default_config": dataclasses.asdict(EngramConfig())},
        os.path.join(directory, "cases.pt"),
    )
    print(f"wrote {len(cases)} layer cases to {directory}")
    if args.bench:
        bench_fixture(directory)
        time_python(directory, args.repeats)


if __name__ == "__main__":
    main()
