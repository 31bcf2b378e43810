"""Saving an EngramLayer for the C++ API (include/engram/layer.h), and reading it back.

``save_layer(layer, path)`` writes one torch.save file: a plain dict of ints,
strings, lists and tensors that LibTorch's ``torch::pickle_load`` reads, so
``engram::load_layer(path)`` in C++ rebuilds the same layer::

    {"format": 1,
     "config": {the EngramConfig fields},
     "layer": {"layer_id", "hidden_size", "hc_mult", "table_placement"},
     "compression": the CompressionTable's int64 lookup,
     "state_dict": layer.state_dict(), on the CPU}

``load_layer(path)`` is the Python reader of the same file. It makes the same
checks as the C++ reader, in the same order, with the same messages: a file
that C++ rejects raises the same text in Python. Only the "device" table
placement (the table held as a parameter) is supported.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .compression import CompressionTable
from .config import EngramConfig
from .layer import EngramLayer

FORMAT = 1
ENTRIES = ["compression", "config", "format", "layer", "state_dict"]
CONFIG_FIELDS = sorted(f.name for f in dataclasses.fields(EngramConfig))
LAYER_FIELDS = ["hc_mult", "hidden_size", "layer_id", "table_placement"]
_LIST_FIELDS = {"engram_vocab_size", "layer_ids"}
_PARAMETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _int32(v: int) -> bool:
    return -(2**31) <= v < 2**31


def pickle_safe(value):
    """`value` with every int outside int32 as a 0-d int64 tensor. Python
    pickles such ints with the LONG1 opcode in as few bytes as they need, and
    LibTorch's unpickler reads only 8-byte LONG1 values (a seed of 2**40 would
    not load in C++); both readers take an int field in either form."""
    if isinstance(value, dict):
        return {k: pickle_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [pickle_safe(v) for v in value]
    if _is_int(value) and not _int32(value):
        return torch.tensor(value, dtype=torch.int64)
    return value


def _plain_int(v):
    """An int field as read: an int, or the 0-d int64 tensor pickle_safe wrote (else None)."""
    if _is_int(v):
        return v
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.int64:
        return int(v)
    return None


def save_layer(layer: EngramLayer, path) -> None:
    """Writes `layer` to `path` for engram::load_layer (C++) or load_layer."""
    if not isinstance(layer, EngramLayer):
        raise TypeError(f"save_layer: layer must be an engram.EngramLayer, got {type(layer).__name__}")
    placement = layer.multi_head_embedding.placement
    if placement != "device":
        raise ValueError(
            f"save_layer: table_placement={placement!r} is not supported: the C++ API holds the table as a "
            "parameter; expected 'device' (build the layer with table_placement='device' and load_state_dict "
            "this one's state_dict into it)"
        )
    state = {key: value.detach().to("cpu").clone() for key, value in layer.state_dict().items()}
    torch.save(
        {
            "format": FORMAT,
            "config": pickle_safe(dataclasses.asdict(layer.config)),
            "layer": pickle_safe({
                "layer_id": layer.layer_id,
                "hidden_size": layer.hidden_size,
                "hc_mult": layer.hc_mult,
                "table_placement": placement,
            }),
            "compression": layer.compression.lookup.clone(),
            "state_dict": state,
        },
        os.fspath(path),
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_dict(value, where: str, what: str, entry: str, entries: str, expected):
    if not isinstance(value, dict):
        raise ValueError(f"{where}{what} is not a dict")
    if any(not isinstance(k, str) for k in value):
        raise ValueError(f"{where}{what} has a key that is not a string")
    for key in expected:
        if key not in value:
            raise ValueError(f"{where}{what} has no {key!r} {entry}; expected the {entries} {expected}")
    for key in sorted(value):
        if key not in expected:
            raise ValueError(f"{where}{what} has an unexpected {entry} {key!r}; expected the {entries} {expected}")
    return value


def _field(d, where: str, section: str, key: str):
    v = d[key]
    if key in _LIST_FIELDS:
        items = [_plain_int(x) for x in v] if isinstance(v, list) else [None]
        if None in items:
            raise ValueError(f"{where}: {section}[{key!r}] is not a list of ints")
        return items
    if key in ("hash", "table_placement"):
        if not isinstance(v, str):
            raise ValueError(f"{where}: {section}[{key!r}] is not a string")
        return v
    if _plain_int(v) is None:
        raise ValueError(f"{where}: {section}[{key!r}] is not an int")
    return _plain_int(v)


def _with_context(where: str, make):
    try:
        return make()
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
        raise ValueError(f"{where}: {err.args[0] if err.args else err}") from err


def load_layer(path) -> EngramLayer:
    """The layer saved by save_layer at `path`, on the CPU, each tensor in its saved dtype."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_layer: {path!r} does not exist or is not a file")
    try:
        file = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a zip archive, truncated, foreign pickle
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"load_layer: cannot read {path!r} as a torch.save archive ({detail})") from err
    return load_layer_from(file, repr(path))


def load_layer_from(file, where: str) -> EngramLayer:
    """A layer from the contents of a save_layer file; `where` names it in errors."""
    if not isinstance(file, dict):
        raise ValueError(
            f"load_layer: {where} does not hold a dict; expected the dict that engram.cpp_io.save_layer writes"
        )
    if "format" not in file:
        raise ValueError(f"load_layer: {where} has no 'format' entry; expected a file written by "
                         "engram.cpp_io.save_layer")
    if not _is_int(file["format"]):
        raise ValueError(f"load_layer: {where}: 'format' is not an int; expected format={FORMAT}")
    if file["format"] != FORMAT:
        raise ValueError(
            f"load_layer: {where} has format={file['format']}; expected format={FORMAT} (the format this engram reads)"
        )
    at_file = f"load_layer: {where}"
    _checked_dict(file, at_file, "", "entry", "entries", ENTRIES)

    cfg = _checked_dict(file["config"], at_file + ": ", "config", "field", "fields", CONFIG_FIELDS)
    fields = {key: _field(cfg, at_file, "config", key) for key in CONFIG_FIELDS}
    config = _with_context(at_file, lambda: EngramConfig(**fields))

    layer_info = _checked_dict(file["layer"], at_file + ": ", "layer", "field", "fields", LAYER_FIELDS)
    info = {key: _field(layer_info, at_file, "layer", key) for key in LAYER_FIELDS}
    if info["table_placement"] != "device":
        raise ValueError(
            f"{at_file}: table_placement={info['table_placement']!r} is not supported: the C++ API holds the table "
            "as a parameter; expected 'device'"
        )

    lookup = file["compression"]
    if not isinstance(lookup, torch.Tensor):
        raise ValueError(f"{at_file}: 'compression' is not a tensor")
    compression = _with_context(at_file, lambda: CompressionTable(lookup))
    layer = _with_context(
        at_file,
        lambda: EngramLayer(config, info["layer_id"], info["hidden_size"], info["hc_mult"], compression,
                            table_placement=info["table_placement"]),
    )

    state = file["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{at_file}: state_dict is not a dict")
    if any(not isinstance(k, str) for k in state):
        raise ValueError(f"{at_file}: state_dict has a key that is not a string")
    for key in sorted(state):
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"{at_file}: state_dict[{key!r}] is not a tensor")
    expected = layer.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ValueError(
                f"{at_file}: state_dict has no {key!r}; the layer expects a tensor of shape {list(value.shape)} there"
            )
    for key in sorted(state):
        if key not in expected:
            raise ValueError(
                f"{at_file}: state_dict has an unexpected key {key!r} (shape {list(state[key].shape)}); the layer "
                "has no parameter or buffer of that name"
            )
    for key, value in expected.items():
        saved = state[key]
        if saved.shape != value.shape:
            raise ValueError(
                f"{at_file}: state_dict[{key!r}] has shape {list(saved.shape)}; the layer expects {list(value.shape)}"
            )
        if value.is_floating_point():
            if saved.dtype not in _PARAMETER_DTYPES:
                raise ValueError(
                    f"{at_file}: state_dict[{key!r}] is {saved.dtype}; expected a floating-point dtype "
                    "(float16, bfloat16, float32 or float64)"
                )
        elif saved.dtype != value.dtype:
            raise ValueError(f"{at_file}: state_dict[{key!r}] is {saved.dtype}; expected {value.dtype}")
    # assign=True: each tensor keeps its saved dtype, as in the C++ reader.
    layer.load_state_dict({key: state[key].clone() for key in expected}, strict=True, assign=True)
    return layer
