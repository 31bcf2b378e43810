"""The layers of an engram.Prefetcher as its engine sees them: one LayerSpec per layer (copies of its hash
parameters and offsets, watched by their version counters, and its table), and the hashing of all layers of a
group in one call where the caller hashes."""

from __future__ import annotations

from typing import List, Optional

import torch

from . import ops


class LayerSpecs:
    def __init__(self, layers, queues) -> None:
        self.layers, self.queues = layers, queues
        self.copies: List[Optional[tuple]] = [None] * len(layers)  # (lookup, keys, sizes, offsets) on the CPU
        self.groups: List[List[int]] = []  # layers one ngram_hash call hashes
        self.watched: set = set()  # the modules whose reassigned tensors call refresh()
        self.stale, self.dedup, self._stacked = True, None, {}

    def build(self, dedup: bool, only: Optional[int] = None) -> None:
        """Builds the specs again: all of them after a refresh, else layer `only`, else the stale ones. Copies, so
        that a worker never reads a buffer the caller may change meanwhile."""
        self.stale, self.dedup = self.stale or dedup != self.dedup, dedup
        indices = range(len(self.layers)) if self.stale else [only] if only is not None else self.queues.stale()
        if self.stale:
            self.stale = False
            self.watched = {m for layer in self.layers
                            for m in (layer, layer.multi_head_embedding, layer.multi_head_embedding.embedding)}
        for index in indices:
            layer = self.layers[index]
            table = layer.multi_head_embedding.embedding.weight
            watched = [layer.hash_lookup, layer.hash_keys, layer.hash_sizes, layer.multi_head_embedding.offsets]
            copies = self.copies[index] = tuple(t.detach().to("cpu", copy=True).contiguous() for t in watched)
            if table.device.type != "cpu":  # on an accelerator: looked up directly, nothing queued
                self.queues.set_layer(index, table)
            else:
                self.queues.set_layer(index, table, *copies[:3], layer.config.pad_id, layer.config.hash, copies[3],
                                      dedup, watched)
        if indices:  # same family, pad, shapes and tokenizer map
            groups, self._stacked = {}, {}
            for index, layer in enumerate(self.layers):
                lookup, keys, sizes, _ = self.copies[index]
                key = (layer.config.hash, layer.config.pad_id, keys.shape, sizes.shape, lookup.numpy().tobytes())
                groups.setdefault(key, []).append(index)
            self.groups = list(groups.values())

    def hash(self, group: List[int], input_ids: torch.Tensor) -> torch.Tensor:
        """[L, B, T, K] hash ids (no offsets) of the group's layers, in one ngram_hash call with their parameters
        stacked on input_ids' device (cached until a spec is built again)."""
        device, copies = input_ids.device, [self.copies[i] for i in group]
        if (group[0], device) not in self._stacked:
            self._stacked[(group[0], device)] = (copies[0][0].to(device), torch.cat([c[1] for c in copies]).to(device),
                                                 torch.cat([c[2] for c in copies]).to(device))
        config = self.layers[group[0]].config
        return ops.ngram_hash(input_ids, *self._stacked[(group[0], device)], None, config.pad_id, config.hash)
