"""torch.export and AOTInductor packages of models with Engram layers.

The Engram tables are runtime inputs of the exported program, never
constants: an Engram table is most of a model's bytes (gigabytes in the
reference configuration) while the rest of the model is small, so a package
that embedded it would be as large as the table, would copy an mmap table
into memory and would have to be rebuilt whenever the table changes. Here the
package holds the compiled code and the dense weights; the caller passes the
tables (any placement: a parameter, a host tensor or a memory-mapped file, no
copy) on every call. See docs/export.md.

    ep = engram.export.export(model, example_ids, max_batch=8, max_seq=256)
    path = engram.export.compile_package(ep, "model.pt2")
    package = engram.export.load_package(path)
    logits = package(input_ids, engram.export.table_tensors(model))
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._loader import OPS_ABI_VERSION
from .layer import EngramLayer, MultiHeadEmbedding

# Keys of the package metadata (strings, readable from C++ through
# AOTIModelPackageLoader::get_metadata()).
METADATA_TABLES = "engram.tables"
METADATA_FORMAT = "engram.export_format"
# The op library's ABI version (include/engram/runtime.h) the package's calls
# of engram ops were compiled against: another library may have other schemas.
METADATA_OPS_ABI = "engram.ops_abi_version"
# JSON {"max_batch": B, "max_seq": T}: the largest input_ids the program takes
# (export's max_batch and max_seq), for a runner to check before it calls.
METADATA_INPUT = "engram.input_ids"
EXPORT_FORMAT = "1"


def _table_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) of every Engram table of model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadEmbedding)
            or type(m).__name__ == "ShardedMultiHeadEmbedding"]


def check_exportable(model: nn.Module) -> None:
    """Raises ValueError when a table of model cannot be exported, naming the
    table, its placement and what to do.

    Exports: every placement ("device", "host", "mmap") on the CPU; the table
    is a runtime input, so the package takes it wherever it lives. Does not:
    a row-sharded table (engram.distributed; its lookup is a collective over a
    process group), a table with an engram.Prefetcher attached (rows staged by
    a Python thread), a host or mmap table whose layer lives on another device
    (the lookup would cross devices inside the package; not supported yet) and
    a table on the meta device (no values to check the export against)."""
    tables = _table_modules(model)
    if not tables:
        raise ValueError(f"engram.export: model ({type(model).__name__}) holds no Engram table; export it with "
                         "torch.export.export directly")
    for name, m in tables:
        if not isinstance(m, MultiHeadEmbedding):
            raise ValueError(
                f"engram.export: table {name!r} is row-sharded (engram.distributed.shard_tables); a sharded "
                "lookup is a collective over the process group and cannot run inside a package. Export a model "
                "built with the whole table (table_placement='device', 'host' or 'mmap'), loaded from "
                "engram.distributed.save's checkpoint"
            )
        weight = m.embedding.weight
        if m.row_source is not None:
            raise ValueError(
                f"engram.export: table {name!r} (table_placement={m.placement!r}) has an engram.Prefetcher "
                "attached; its rows come from a Python thread that a package cannot call. Close the prefetcher "
                "(prefetcher.close()) before export"
            )
        if weight.is_meta:
            raise ValueError(f"engram.export: table {name!r} (table_placement={m.placement!r}) is on the meta "
                             "device; load or initialise its values before export")
        layer_device = m.offsets.device
        if m.placement != "device" and weight.device != layer_device:
            raise ValueError(
                f"engram.export: table {name!r} has table_placement={m.placement!r} on {weight.device} while its "
                f"layer is on {layer_device}; a package cannot copy rows across devices yet. Export the model on "
                f"{weight.device} (model.to({str(weight.device)!r})), or with table_placement='device'"
            )


def table_names(model: nn.Module) -> List[str]:
    """Qualified parameter names of model's Engram tables, in the order the
    exported program takes them."""
    return [f"{name}.embedding.weight" for name, _ in _table_modules(model)]


def table_tensors(model: nn.Module) -> Tuple[torch.Tensor, ...]:
    """model's Engram tables (detached, no copy), in the exported program's order."""
    return tuple(m.embedding.weight.detach() for _, m in _table_modules(model))


@contextlib.contextmanager
def _tables_removed(embeddings: Sequence[nn.Embedding]) -> Iterator[None]:
    """Takes the table parameters out of the module tree while export traces,
    so that they are neither lifted into the program's state_dict nor given to
    AOTInductor as constants; puts them back afterwards."""
    saved = [e._parameters.pop("weight") for e in embeddings]
    try:
        yield
    finally:
        for e, p in zip(embeddings, saved):
            e._parameters["weight"] = p


class TablesAsInputs(nn.Module):
    """forward(input_ids, tables, **kwargs) = model(input_ids, **kwargs) with
    model's Engram tables replaced by ``tables`` (a tuple, in table_names
    order). Used under export, while the table parameters are removed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Plain list, not a ModuleList: the embeddings are already submodules of model.
        self._embeddings = [m.embedding for _, m in _table_modules(model)]

    def forward(self, input_ids: torch.Tensor, tables: Tuple[torch.Tensor, ...], **kwargs):
        for e, t in zip(self._embeddings, tables):
            e.weight = t  # a plain attribute while the parameter is removed
        try:
            return self.model(input_ids, **kwargs)
        finally:
            for e in self._embeddings:
                del e.weight


def export(model: nn.Module, input_ids: torch.Tensor, max_batch: int, max_seq: int,
           kwargs: Optional[Dict] = None, strict: bool = False) -> torch.export.ExportedProgram:
    """torch.export of model in inference (eval, no_grad) with a dynamic batch
    (1..max_batch) and sequence length (1..max_seq); the Engram tables are
    runtime inputs: program(input_ids, tables, **kwargs)."""
    check_exportable(model)
    for name, value in (("max_batch", max_batch), ("max_seq", max_seq)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"engram.export: {name}={value!r}; expected an int >= 2")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"engram.export: input_ids must be a [B, T] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    wrapper = TablesAsInputs(model)
    tables = table_tensors(model)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    kwargs = dict(kwargs or {})
    dynamic = {"input_ids": {0: batch, 1: seq}, "tables": (None,) * len(tables)}
    if kwargs:
        dynamic["kwargs"] = {k: None for k in kwargs}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _tables_removed(wrapper._embeddings):
            return torch.export.export(wrapper, (input_ids, tables), kwargs, dynamic_shapes=dynamic, strict=strict)
    finally:
        model.train(was_training)


def _table_records(tables: Sequence[torch.Tensor], names: Sequence[str]) -> List[Dict]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, tables)]


def compile_package(ep: torch.export.ExportedProgram, path: str, model: Optional[nn.Module] = None,
                    inductor_configs: Optional[Dict] = None) -> str:
    """AOTInductor package of an exported program at path (.pt2). The table
    names, shapes and dtypes go into the package metadata, which load_package
    (and a C++ runner through get_metadata) checks the tables against."""
    specs = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    # The user inputs are input_ids then the tables (then any kwargs): the table shapes are static.
    table_vals = [placeholders[s.arg.name].meta["val"] for s in specs[1:]]
    table_vals = [v for v in table_vals if isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point()]
    names = table_names(model) if model is not None else [f"table_{i}" for i in range(len(table_vals))]
    ids_shape = placeholders[specs[0].arg.name].meta["val"].shape
    bounds = [int(d) if isinstance(d, int) else int(ep.range_constraints[d.node.expr].upper) for d in ids_shape]
    metadata = {METADATA_FORMAT: EXPORT_FORMAT, METADATA_OPS_ABI: str(OPS_ABI_VERSION),
                METADATA_TABLES: json.dumps(_table_records(table_vals, names)),
                METADATA_INPUT: json.dumps({"max_batch": bounds[0], "max_seq": bounds[1]})}
    configs = {"aot_inductor.metadata": metadata, **(inductor_configs or {})}
    return torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=configs)


def check_metadata(meta: Dict[str, str], path: str) -> List[Dict]:
    """The table records of a package's metadata, after checking that it is a
    compile_package package for the op library loaded now; raises ValueError
    naming the package, the key, what it holds and what was expected."""
    if meta.get(METADATA_FORMAT) != EXPORT_FORMAT:
        raise ValueError(f"engram.export: {path!r} is not a package of engram.export.compile_package format "
                         f"{EXPORT_FORMAT} (metadata {METADATA_FORMAT}={meta.get(METADATA_FORMAT)!r})")
    abi = meta.get(METADATA_OPS_ABI)
    if abi != str(OPS_ABI_VERSION):
        got = "no op library ABI version" if abi is None else f"op library ABI version {abi}"
        raise ValueError(f"engram.export: {path!r} was exported for {got} (metadata {METADATA_OPS_ABI}); the "
                         f"loaded engram op library has version {OPS_ABI_VERSION}. Export it again with this engram")
    return json.loads(meta[METADATA_TABLES])


class Package:
    """A loaded AOTInductor package: package(input_ids, tables) checks the
    tables against the ones it was exported with, then runs it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runner = torch._inductor.aoti_load_package(path)
        meta = self.runner.get_metadata()
        self.tables: List[Dict] = check_metadata(meta, path)
        self.max_input: Optional[Dict] = json.loads(meta[METADATA_INPUT]) if METADATA_INPUT in meta else None

    def check_tables(self, tables: Sequence[torch.Tensor]) -> None:
        if len(tables) != len(self.tables):
            raise ValueError(f"engram.export: the package {self.path!r} takes {len(self.tables)} Engram tables "
                             f"({[t['name'] for t in self.tables]}), got {len(tables)}")
        for i, (t, want) in enumerate(zip(tables, self.tables)):
            dtype = str(t.dtype).replace("torch.", "")
            if list(t.shape) != want["shape"] or dtype != want["dtype"]:
                raise ValueError(
                    f"engram.export: tables[{i}] is a {dtype} table of shape {list(t.shape)}; the package "
                    f"{self.path!r} was exported with {want['name']!r} as a {want['dtype']} table of shape "
                    f"{want['shape']} (another Engram configuration?)"
                )

    def __call__(self, input_ids: torch.Tensor, tables: Sequence[torch.Tensor], **kwargs):
        self.check_tables(tables)
        if self.max_input is not None and (input_ids.shape[0] > self.max_input["max_batch"]
                                           or input_ids.shape[-1] > self.max_input["max_seq"]):
            raise ValueError(f"engram.export: input_ids of shape {list(input_ids.shape)}; the package {self.path!r} "
                             f"takes up to [{self.max_input['max_batch']}, {self.max_input['max_seq']}] "
                             "(export's max_batch, max_seq)")
        return self.runner(input_ids, tuple(tables), **kwargs)


def load_package(path: str) -> Package:
    """Loads a package written by compile_package (engram's ops must be loaded: import engram)."""
    return Package(path)


def table_bytes(tables: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tables)


@torch.no_grad()
def greedy_decode(step, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: step(ids [B, T]) -> logits [B, T, V];
    appends the argmax of the last position new_tokens times."""
    ids = prompt
    for _ in range(new_tokens):
        logits = step(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
