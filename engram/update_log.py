"""What engram.Prefetcher knows of a layer's table changing between a gather
and its use, and how staged rows are brought up to date at use (the order
with updates: docs/design.md, "The prefetcher")."""

from __future__ import annotations

from typing import List

import torch


class UpdateLog:
    """The updates of one layer's table the prefetcher recorded (fused
    row-wise updates, sparse gradients' steps): their count (epoch), their
    version bumps (any other bump is a change of unknown rows) and, while a
    batch may need them, the rows each changed."""

    def __init__(self) -> None:
        self.epoch, self.own_bumps = 0, 0
        self.updates: List[tuple] = []  # (epoch after, rows)

    def record(self, bumps: int, rows: torch.Tensor, needed: bool) -> None:
        self.epoch, self.own_bumps = self.epoch + 1, self.own_bumps + bumps
        if needed:  # a batch gathered before this update is pending
            self.updates.append((self.epoch, rows))

    def catch_up(self, weight, ticket, ids, rows, staged, pending_epochs, stats):
        """Staged rows (deduplicated `rows`, else the table rows `ids` of each
        lookup) as the table holds them now: the recorded updates' rows read
        again, or everything after a change of unknown rows. staged may be on
        another device than the table."""
        foreign = (weight._version - ticket.table_version) - (self.own_bumps - ticket.own_bumps)
        changed = [r for epoch, r in self.updates if epoch > ticket.epoch]
        # Drop the records no pending batch needs any more.
        self.updates = [(e, r) for e, r in self.updates if e > min(pending_epochs, default=self.epoch)]
        if foreign == 0 and not changed:
            return staged
        table = weight.detach()
        if foreign != 0:
            stats.regathers += 1
            return table[rows if rows is not None else ids].to(staged.device)
        changed = torch.cat(changed).to(table.device)
        if rows is not None:  # rows sorted: find the changed ones
            pos = torch.searchsorted(rows, changed)
            hit = pos < rows.numel()
            hit[hit.clone()] = rows[pos[hit]] == changed[hit]
            pos = pos[hit]
            staged[pos.to(staged.device)] = table[rows[pos]].to(staged.device)
        else:
            # Integer positions found on the table's device (the CPU): a boolean
            # mask sent to an accelerator would make index_put count it there, a host sync.
            pos = torch.isin(ids, changed).reshape(-1).nonzero().squeeze(1)
            flat = staged.view(-1, staged.shape[-1])
            flat[pos.to(staged.device, non_blocking=True)] = table[ids.reshape(-1)[pos]].to(staged.device,
                                                                                             non_blocking=True)
            pos = ids.reshape(-1)[pos]
        stats.patched_rows += int(torch.unique(pos).numel())
        return staged
