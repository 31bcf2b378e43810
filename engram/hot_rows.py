"""The hot-row cache of engram.Prefetcher: per layer, a copy of the table's most looked-up rows (LFU with
aging). Deduplicated gathers skip the cached rows (the use takes them from the copy, on the consumer's device);
expanded ones copy them from the compact CPU copy. With updates (docs/design.md, "Table placements and the
prefetcher"): recorded ones mark rows dirty, copied into the cache before the next gather; other changes
(version counter) read it all again; a new hot set is new tensors (a running gather keeps its snapshot).
Staged rows are brought up to date at use like any others, so the cache never changes a result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch


@dataclass
class HotSnapshot:
    """rows [H] sorted (CPU), data = table[rows] on the cache's device, as of `version` and `own_bumps`."""

    rows: torch.Tensor
    data: torch.Tensor
    version: int
    own_bumps: int


@dataclass
class _Layer:
    size: int  # rows to keep
    device: torch.device
    current: Optional[HotSnapshot] = None
    window: List[torch.Tensor] = field(default_factory=list)  # rows looked up since the last choice
    # The rows counted before the window (sorted) and their counts, halved at every choice.
    seen_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    seen_counts: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    dirty: List[torch.Tensor] = field(default_factory=list)  # rows updated since data was last synced


def _read(table: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table.detach().index_select(0, rows).to(device)


class HotRows:
    """hot_rows: rows per table (int) or share of its rows (float in (0, 1]), chosen every `refresh` batches."""

    def __init__(self, hot_rows, refresh: int, stats) -> None:
        self.hot_rows, self.refresh, self.stats = hot_rows, refresh, stats
        self._layers: Dict[int, _Layer] = {}

    def snapshot(self, index: int, table, hashed: torch.Tensor, offsets: torch.Tensor, dedup: bool,
                 device: torch.device, own_bumps: int) -> Optional[HotSnapshot]:
        """The cache the gather of these hash ids may use, up to date with the table; counts the ids."""
        # Deduplicated gathers leave the cached rows to the consumer's device;
        # expanded ones copy them on the worker, so the cache is on the CPU.
        where = device if dedup else torch.device("cpu")
        hot = self._layers.get(index)
        if hot is None or hot.device != where:
            size = max(1, int(self.hot_rows * table.shape[0])) if isinstance(self.hot_rows, float) else \
                min(self.hot_rows, table.shape[0])
            hot = self._layers[index] = _Layer(size, where)
        # Chosen from the batches before this one only: no look at the rows it serves.
        if len(hot.window) >= self.refresh:
            # The window's counts plus half the older ones; the most looked-up
            # rows win, ties to the lower row.
            window = torch.cat(hot.window)
            hot.window.clear()
            rows, inverse = torch.unique(torch.cat([hot.seen_rows, window]), sorted=True, return_inverse=True)
            weights = torch.cat([hot.seen_counts * 0.5, torch.ones(window.numel(), dtype=torch.float64)])
            counts = torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, inverse, weights)
            order = torch.sort(counts, descending=True, stable=True).indices
            history = torch.sort(order[: 4 * hot.size]).values  # counts kept for 4x the cache: rows on their way up
            hot.seen_rows, hot.seen_counts = rows[history], counts[history]
            rows = torch.sort(rows[order[: hot.size]]).values
            # New tensors, never written in place: a gather still running may read the old snapshot.
            hot.current = HotSnapshot(rows, _read(table, rows, where), table._version, own_bumps)
            hot.dirty.clear()
            self.stats.cache_refreshes += 1
        hot.window.append((hashed + offsets).reshape(-1))
        current = hot.current
        if current is None:
            return None
        if (table._version - current.version) != (own_bumps - current.own_bumps):
            # Changed by something other than a recorded update: read it all again.
            current = hot.current = HotSnapshot(current.rows, _read(table, current.rows, where), table._version,
                                                own_bumps)
            hot.dirty.clear()
        elif hot.dirty:
            # No gather of this table is running (the updates waited for them
            # and none was submitted since), so the data may change in place.
            pos = torch.isin(current.rows, torch.cat(hot.dirty)).nonzero().squeeze(1)
            hot.dirty.clear()
            if pos.numel():
                current.data[pos.to(current.data.device)] = _read(table, current.rows[pos], where)
        current.version, current.own_bumps = table._version, own_bumps
        return current

    def mark_dirty(self, index: int, rows: torch.Tensor) -> None:
        """Rows of layer `index`'s table a recorded update changed: copied into the cache before the next gather."""
        hot = self._layers.get(index)
        if hot is not None and hot.current is not None:
            hot.dirty.append(rows.detach().to("cpu"))


def assemble(rows, misses, slots, cache_data, device) -> torch.Tensor:
    """[U, Dh] on `device`: the cache's rows where slots >= 0, else the gathered ones in order."""
    data = torch.empty((rows.numel(), misses.shape[1]), dtype=misses.dtype, device=device)
    hit = slots >= 0
    hit_pos, miss_pos = hit.nonzero().squeeze(1), (~hit).nonzero().squeeze(1)  # on the CPU: no sync
    data[miss_pos.to(device, non_blocking=True)] = misses.to(device, non_blocking=True)
    data[hit_pos.to(device, non_blocking=True)] = cache_data[slots[hit].to(cache_data.device, non_blocking=True)]
    return data
