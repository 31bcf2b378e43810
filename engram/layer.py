"""EngramLayer: the full Engram module (spec §3-7)."""

from __future__ import annotations

import collections
import os
import weakref
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import lookup as _lookup
from . import ops
from .compression import CompressionTable
from .config import EngramConfig
from .hashing import NgramHasher

# Vocabulary of the reference release's tokenizer (DeepSeek-V3); used for the
# identity compression when a layer is built without a CompressionTable.
DEFAULT_VOCAB_SIZE = 129280


TABLE_PLACEMENTS = ("device", "host", "mmap")


def _file_table(path: str, rows: int, dim: int, dtype: torch.dtype) -> Tuple[np.memmap, bool]:
    """The [rows, dim] table stored at `path` as a .npy file, memory-mapped
    read-write (changes go to the file): created if missing, else reopened
    after checking its shape and dtype. Returns (memmap, created)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    if not os.path.exists(path):
        # .npy rather than raw bytes: the header records shape and dtype, so a
        # reopen can tell a table of another layer or dtype from this one.
        return np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(rows, dim)), True
    try:
        array = np.lib.format.open_memmap(path, mode="r+")
    except Exception as err:  # not a .npy file, truncated header, ...
        raise ValueError(
            f"EngramLayer: table_path={path!r} exists but is not an .npy table file ({err}); expected a "
            f"[{rows}, {dim}] {np_dtype} table or no file (then it is created)"
        ) from err
    if array.dtype != np_dtype or array.shape != (rows, dim) or not array.flags.c_contiguous:
        raise ValueError(
            f"EngramLayer: table_path={path!r} holds a {array.dtype} table of shape {list(array.shape)}"
            f"{'' if array.flags.c_contiguous else ' (Fortran order)'}; expected a C-order {np_dtype} table of "
            f"shape [{rows}, {dim}] (another layer's or model's file?)"
        )
    return array, False


class TableFileChangedError(RuntimeError):
    """An mmap table's file was truncated, replaced or removed while the table
    is in use (raised instead of reading or writing rows that may no longer be
    backed by the file, which would kill the process with SIGBUS)."""


def file_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """(st_dev, st_ino, st_size) of the file at `path`, or None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size


def file_change(recorded: Tuple[int, int, int], now: Optional[Tuple[int, int, int]]) -> Optional[str]:
    """How the file changed from `recorded` to `now` ("removed", "replaced",
    "truncated", "resized"), or None if it did not."""
    if now is None:
        return "removed"
    if now[:2] != recorded[:2]:
        return "replaced"
    if now[2] < recorded[2]:
        return "truncated"
    if now[2] != recorded[2]:
        return "resized"
    return None


def _describe(identity: Optional[Tuple[int, int, int]]) -> str:
    if identity is None:
        return "no file"
    return f"device {identity[0]}, inode {identity[1]}, {identity[2]} bytes"


def _file_change_message(owner: str, path: str, recorded, now, change: str, when: str) -> str:
    consequence = {
        "truncated": "rows past the new end are no longer backed by the file (touching them would raise SIGBUS)",
        "resized": "another writer changed it",
        "replaced": "this table still maps the old file, whose updates would no longer reach the path",
        "removed": "this table still maps the unlinked old file, whose updates would be lost",
    }[change]
    return (
        f"{owner}: the mmap table file {path!r} was {change} while in use (found before {when}): opened as "
        f"({_describe(recorded)}), now ({_describe(now)}); {consequence}. Nothing was read or written; restore "
        f"the file or rebuild the layer from it"
    )


# mmap tables alive, for the optimizer step pre-hook below: a torch.optim step
# writes the mapping outside any lookup, so it checks the files first.
_MMAP_TABLES: "weakref.WeakSet" = weakref.WeakSet()
_step_hook = None


def _check_mmap_tables_before_step(optimizer, args, kwargs) -> None:
    if not _MMAP_TABLES:
        return
    tables = {id(m.embedding.weight): m for m in list(_MMAP_TABLES) if m.placement == "mmap"}
    for group in optimizer.param_groups:
        for param in group["params"]:
            module = tables.get(id(param))
            if module is not None:
                module.check_table_file(f"an optimizer step ({type(optimizer).__name__})")


class MultiHeadEmbedding(nn.Module):
    """K hashed heads in one table of sum(sizes) rows (spec §4).

    ``placement`` says where the table lives: "device" (an nn.Embedding
    parameter that moves with the module), "host" (CPU memory, pinned when
    CUDA is available) or "mmap" (a memory-mapped .npy file at ``path``). A
    host or mmap table stays in CPU memory and keeps its dtype when the module
    is moved or cast; lookups from another device copy the ids there and the
    rows back. It is still ``embedding.weight``, a parameter, so state_dict,
    load_state_dict and optimizers see it.
    """

    def __init__(self, head_sizes, head_dim: int, placement: str = "device", path: Optional[str] = None) -> None:
        super().__init__()
        if placement not in TABLE_PLACEMENTS:
            raise ValueError(f"EngramLayer: table_placement={placement!r}; expected one of {list(TABLE_PLACEMENTS)}")
        if placement == "mmap" and not path:
            raise ValueError("EngramLayer: table_placement='mmap' needs table_path, the file that holds the table")
        if placement != "mmap" and path is not None:
            raise ValueError(
                f"EngramLayer: table_path={path!r} is only used with table_placement='mmap', got "
                f"table_placement={placement!r}"
            )
        sizes = torch.as_tensor(list(head_sizes), dtype=torch.int64, device="cpu")
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes)
        rows = int(sizes.sum())
        self.placement, self.table_path = placement, (os.fspath(path) if path is not None else None)
        if placement == "device":
            self.embedding = nn.Embedding(rows, head_dim)
        else:
            dtype = torch.get_default_dtype()
            if placement == "host":
                table, created = torch.empty((rows, head_dim), dtype=dtype, pin_memory=_pin_memory()), True
            else:
                self._file_array, created = _file_table(self.table_path, rows, head_dim, dtype)
                self.record_table_file()
                table = torch.from_numpy(self._file_array)
            if created:
                # nn.Embedding's own initialisation, drawn from the same
                # generator in the same order: equal seeds give equal tables in
                # every placement. A reopened file keeps its contents.
                nn.init.normal_(table)
            self.embedding = nn.Embedding(rows, head_dim, _weight=table)
        # How the table trains (engram.lookup picks the backward from these):
        # the row-wise optimizer make_rowwise attached, else a sparse or dense
        # gradient.
        self.sparse = False
        self.table_optimizer = None
        # Set by engram.Prefetcher: row_source(module, hash_ids, input_ids)
        # serves the lookup from rows gathered ahead of time.
        self.row_source = None
        self._update_listeners: "collections.OrderedDict" = collections.OrderedDict()  # weakref-able, for RemovableHandle
        self._change_listeners: "collections.OrderedDict" = collections.OrderedDict()

    # Named in a changed-file error; EngramLayer sets its layer id here.
    file_owner = "MultiHeadEmbedding"

    def record_table_file(self) -> None:
        """Records the identity (device, inode, size) of the mmap table's file, just
        mapped: every lookup and update first checks the path still has it."""
        self._file_id = file_identity(self.table_path)
        global _step_hook
        if _step_hook is None:
            _step_hook = register_optimizer_step_pre_hook(_check_mmap_tables_before_step)
        _MMAP_TABLES.add(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict copies into the mapping outside any lookup.
        if self.placement == "mmap" and prefix + "embedding.weight" in state_dict:
            self.check_table_file("load_state_dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def table_file_problem(self, when: str = "a lookup") -> Optional[str]:
        """None if this is not an mmap table or its file is as it was opened; else
        the error message (one os.stat: cheap next to any gather). A window
        remains: the file can still change between this check and the access."""
        if self.placement != "mmap":
            return None
        now = file_identity(self.table_path)
        change = file_change(self._file_id, now)
        if change is None:
            return None
        return _file_change_message(self.file_owner, self.table_path, self._file_id, now, change, when)

    def check_table_file(self, when: str = "a lookup") -> None:
        """Raises TableFileChangedError if the mmap table's file changed since it was opened."""
        problem = self.table_file_problem(when)
        if problem is not None:
            raise TableFileChangedError(problem)

    def add_update_listener(self, listener) -> "torch.utils.hooks.RemovableHandle":
        """listener(table, update, rows) runs each fused row-wise update of this
        table: it must call update() once, and may order work around it (a
        prefetcher waits for its gathers first). Returns a handle to remove it."""
        handle = torch.utils.hooks.RemovableHandle(self._update_listeners)
        self._update_listeners[handle.id] = listener
        return handle

    def run_table_update(self, update, rows: torch.Tensor) -> None:
        """Runs a fused row-wise update of rows of the table through the listeners."""
        self.check_table_file("a row-wise update")
        table = self.embedding.weight
        for listener in reversed(list(self._update_listeners.values())):
            update = (lambda listener, inner: lambda: listener(table, inner, rows))(listener, update)
        update()

    def add_change_listener(self, listener) -> "torch.utils.hooks.RemovableHandle":
        """listener() runs after the module is moved or cast (_apply): whoever
        copied its tensors (a prefetcher) builds its copies again. Returns a handle."""
        handle = torch.utils.hooks.RemovableHandle(self._change_listeners)
        self._change_listeners[handle.id] = listener
        return handle

    def _apply(self, fn, recurse=True):
        try:
            if self.placement == "device":
                return super()._apply(fn, recurse)
            # The host / file table stays where it is (moving or casting it would
            # drop the pinned or file-backed memory); the offsets follow the module.
            embedding = self._modules.pop("embedding")
            try:
                super()._apply(fn, recurse)
            finally:
                self._modules["embedding"] = embedding
            return self
        finally:
            for listener in list(self._change_listeners.values()):
                listener()

    def flush(self) -> None:
        """Writes an mmap table's changed pages to its file (the OS does so
        eventually anyway); a no-op for other placements."""
        if self.placement == "mmap":
            self.check_table_file("a flush")
            self._file_array.flush()

    def lookup(self, weight: torch.Tensor, hash_ids: torch.Tensor, offsets: torch.Tensor,
               staged=None) -> torch.Tensor:
        """The lookup in every placement, from the table or from a prefetcher's
        staged rows; its backward follows this module's state (engram.lookup)."""
        return _lookup.lookup(self, weight, hash_ids, offsets, staged)

    def forward(self, hash_ids: torch.Tensor, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (optional): the token ids hash_ids were computed from, by
        the owning EngramLayer; a prefetcher may match them (a few KB) instead
        of the hash ids."""
        if self.row_source is not None:
            self.check_table_file()
            return self.row_source(self, hash_ids, input_ids)
        return self.direct_forward(hash_ids)

    def direct_forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """forward without a prefetcher: the rows are read from the table now."""
        self.check_table_file()
        weight = self.embedding.weight
        if weight.device != hash_ids.device:  # host / mmap table, layer on an accelerator
            out = self.lookup(weight, hash_ids.to(weight.device), self.offsets.to(weight.device))
            return out.to(hash_ids.device, non_blocking=True)
        return self.lookup(weight, hash_ids, self.offsets)


def _pin_memory() -> bool:
    return torch.cuda.is_available()


class ShortConv(nn.Module):
    """Per-branch RMSNorm, depthwise causal dilated conv over T, SiLU, plus the
    gated value as residual (spec §5-6), in one fused op."""

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.kernel_size, self.dilation = kernel_size, dilation
        # Kept as nn.Conv1d / nn.RMSNorm for the reference parameter names and
        # initialisation; forward reads their weights.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult)])

    def forward(self, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """value [B, T, D] (shared by the branches), gate [B, T, G] -> [B, T, G, D]:
        x + SiLU(conv(RMSNorm(x))) with x[:, :, g] = gate[:, :, g] * value."""
        norm_weight = torch.stack([norm.weight for norm in self.norms])
        conv_weight = self.conv.weight.flatten(1)  # [G*D, 1, K] -> [G*D, K]
        return ops.gated_short_conv(value, gate, norm_weight, conv_weight, self.dilation, self.norms[0].eps)


class EngramLayer(nn.Module):
    """One Engram layer: hash the last 2..N tokens, look the rows up, gate them
    against each residual branch and return the update for the residual stream.

    forward(hidden_states [B, T, G, D] (or [B, T, D] when G = 1), input_ids [B, T])
    returns a tensor shaped like hidden_states; the caller adds it.

    table_placement: "device" (default; the table is a parameter that moves
    with the layer), "host" (host memory, pinned when CUDA is available, while
    the rest of the layer may live on an accelerator) or "mmap" (a .npy file at
    table_path, created and initialised on first use, reopened with its
    contents later; for tables larger than RAM). Outputs and gradients are the
    same in every placement; engram.Prefetcher gathers host / mmap rows ahead
    of use.
    """

    def __init__(
        self,
        config: EngramConfig,
        layer_id: int,
        hidden_size: int,
        hc_mult: int = 1,
        compression: Optional[CompressionTable] = None,
        table_placement: str = "device",
        table_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ValueError(f"EngramLayer: layer_id={layer_id} is not in config.layer_ids={config.layer_ids}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"EngramLayer: hidden_size={hidden_size!r}, expected a positive int")
        if not isinstance(hc_mult, int) or hc_mult < 1:
            raise ValueError(f"EngramLayer: hc_mult={hc_mult!r}, expected a positive int")
        if compression is None:
            compression = CompressionTable.identity(DEFAULT_VOCAB_SIZE)
        self.config, self.layer_id = config, layer_id
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.compression = compression
        self.hasher = NgramHasher(config, compression)

        n = config.max_ngram_size
        engram_dim = (n - 1) * config.n_embed_per_ngram
        self.multi_head_embedding = MultiHeadEmbedding(
            self.hasher.head_sizes(layer_id), config.head_dim, table_placement, table_path
        )
        self.multi_head_embedding.file_owner = f"EngramLayer layer_id={layer_id}"
        self.short_conv = ShortConv(hidden_size, hc_mult, config.kernel_size, dilation=n)
        self.value_proj = nn.Linear(engram_dim, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(engram_dim, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

        # Hash parameters of this layer as non-persistent buffers: .to(device)
        # moves them, state_dict keys stay spec §7's, and forward calls the op
        # directly (no Python-side cache for torch.compile to trip over).
        keys = self.hasher.multipliers(layer_id) if config.hash == "deepseek" else self.hasher.xxh64_seeds(layer_id)
        self.register_buffer("hash_lookup", compression.lookup.clone(), persistent=False)
        self.register_buffer("hash_keys", keys[None], persistent=False)
        self.register_buffer("hash_sizes", torch.tensor([self.hasher.head_sizes(layer_id)]), persistent=False)

    def hash(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, K] hash ids of this layer (without offsets)."""
        return ops.ngram_hash(
            input_ids, self.hash_lookup, self.hash_keys, self.hash_sizes, None, self.config.pad_id, self.config.hash
        )[0]

    def fused_projection_weights(self):
        """value_proj and every key_proj as one [(G+1)*D, (N-1)*E] weight and bias:
        one GEMM instead of G+1 over the same input."""
        linears = [self.value_proj, *self.key_projs]
        return torch.cat([l.weight for l in linears]), torch.cat([l.bias for l in linears])

    def _check_inputs(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns hidden_states as [B, T, G, D]; raises on shapes or dtypes that do not fit."""
        if hidden_states.dim() == 3:
            if self.hc_mult != 1:
                raise ValueError(
                    f"EngramLayer: hidden_states has shape {list(hidden_states.shape)} but hc_mult={self.hc_mult}; "
                    "expected [B, T, G, D]"
                )
            hidden_states = hidden_states.unsqueeze(2)
        if hidden_states.dim() != 4 or hidden_states.shape[2:] != (self.hc_mult, self.hidden_size):
            raise ValueError(
                f"EngramLayer: hidden_states has shape {list(hidden_states.shape)}; expected "
                f"[B, T, {self.hc_mult}, {self.hidden_size}]"
                + (f" or [B, T, {self.hidden_size}]" if self.hc_mult == 1 else "")
            )
        if input_ids.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"EngramLayer: input_ids has shape {list(input_ids.shape)}; expected [B, T] = "
                f"{list(hidden_states.shape[:2])} to match hidden_states"
            )
        weight_dtype = self.value_proj.weight.dtype
        if hidden_states.dtype != weight_dtype:
            raise TypeError(
                f"EngramLayer: hidden_states is {hidden_states.dtype} but the layer's weights are {weight_dtype}; "
                "expected one dtype (convert the layer with .to(dtype))"
            )
        return hidden_states

    def _value_and_gate(self, hidden_states: torch.Tensor, input_ids: torch.Tensor):
        """Spec §4-5 on [B, T, G, D] hidden states: the shared value [B, T, D] and the gate [B, T, G]."""
        b, t = input_ids.shape
        d, g = self.hidden_size, self.hc_mult
        e = self.multi_head_embedding(self.hash(input_ids), input_ids).reshape(b, t, -1).to(hidden_states.dtype)
        weight, bias = self.fused_projection_weights()
        value, keys = nn.functional.linear(e, weight, bias).split([d, g * d], dim=-1)
        gate = ops.context_gate(
            keys.unflatten(-1, (g, d)),
            hidden_states,
            torch.stack([norm.weight for norm in self.norm1]),
            torch.stack([norm.weight for norm in self.norm2]),
            self.norm1[0].eps,
        )
        return value, gate

    def gate(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The context gate alone, [B, T, G] values in (0, 1): how much of the
        looked-up n-gram memory each token lets into each residual branch."""
        hidden_states = self._check_inputs(hidden_states, input_ids)
        return self._value_and_gate(hidden_states, input_ids)[1]

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        squeeze = hidden_states.dim() == 3
        hidden_states = self._check_inputs(hidden_states, input_ids)
        value, gate = self._value_and_gate(hidden_states, input_ids)
        out = self.short_conv(value, gate)  # gate * value + SiLU(conv(...)), [B, T, G, D]
        return out.squeeze(2) if squeeze else out

    def extra_repr(self) -> str:
        w = self.multi_head_embedding.embedding.weight
        return (
            f"layer_id={self.layer_id}, rows={w.shape[0]:,}, head_dim={w.shape[1]}, "
            f"table_bytes={w.numel() * w.element_size():,}, hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, "
            f"hash={self.config.hash!r}"
            + (f", table_placement={self.multi_head_embedding.placement!r}"
               if self.multi_head_embedding.placement != "device" else "")
        )
