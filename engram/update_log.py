"""engram.Prefetcher's order with table updates (docs/design.md, "Table placements and the prefetcher"):
updates wait for their table's gathers and are recorded; batches current before a fused update get its rows
read again on a worker; staged rows are brought up to date at use from the records, or gathered again after a
change of unknown rows (the version counter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from . import _loader

_engine = _loader.load("_engine")


@dataclass
class UpdateLog:
    """The updates of one layer's table the prefetcher recorded (fused row-wise updates, sparse gradients'
    steps): their count (epoch), their version bumps (any other bump is a change of unknown rows) and, while a
    batch may need them, the rows each changed."""

    epoch: int = 0
    own_bumps: int = 0
    updates: List[tuple] = field(default_factory=list)  # (epoch after, rows)


class TableUpdates:
    """The update logs of a prefetcher's layers, and the ordering around updates."""

    def __init__(self, modules, queues, pool, stats, hot) -> None:
        self.modules, self.queues, self.pool, self.stats, self.hot = modules, queues, pool, stats, hot
        self.logs = [UpdateLog() for _ in modules]

    def run(self, table: torch.Tensor, update, rows: torch.Tensor, patch: bool = True) -> None:
        """Runs a row-wise update of `table` (its modules' update listener) after its gathers in flight and
        records the rows it changed. patch: its batches that were current before get those rows read again on a
        worker, overlapped with what follows, instead of at use on the critical path."""
        if table.device.type != "cpu":  # never gathered: nothing to order (its rows may hold -1 padding)
            return update()
        indices = [i for i, m in enumerate(self.modules) if m.embedding.weight is table]
        pending = self.wait(indices)
        before, prior = table._version, {i: (self.logs[i].epoch, self.logs[i].own_bumps) for i in indices}
        update()
        for i in indices:
            log = self.logs[i]
            log.epoch, log.own_bumps = log.epoch + 1, log.own_bumps + table._version - before
            if any(j == i for j, _ in pending):  # a batch gathered before this update needs its rows
                log.updates.append((log.epoch, rows))
            self.queues.set_counters(i, log.epoch, log.own_bumps)
            if self.hot is not None:
                self.hot.mark_dirty(i, rows)
        changed = None
        for i, ticket in pending if patch else ():
            (epoch, own_bumps), log = prior[i], self.logs[i]
            # Only a batch with nothing else to catch up on (no earlier update, no change of unknown rows).
            if ticket.epoch == epoch and before - ticket.table_version == own_bumps - ticket.own_bumps:
                changed = rows.detach().to("cpu").contiguous() if changed is None else changed
                if self.pool.patch(ticket, table.detach(), changed, table._version, log.epoch, log.own_bumps):
                    self.stats.patched_batches += 1

    def before_step(self, optimizer, *args) -> None:
        """An optimizer is about to step: no gather of its tables may run
        while it writes them, and the rows of sparse gradients will change."""
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            indices = [i for i, m in enumerate(self.modules) if m.embedding.weight is p]
            if indices and p.grad is not None and p.grad.is_sparse:
                self.run(p, lambda: None, p.grad._indices()[0], patch=False)
            self.wait(indices)  # a dense step: gathered again

    def wait(self, indices) -> list:
        """Waits for the pending batches of layers `indices` (their errors are raised at use); (index, ticket)s."""
        pending = [(i, t) for i in indices for t in self.queues.pending(i)]
        for _, ticket in pending:
            try:
                if ticket.kind == _engine.TaskKind.DEVICE_GATHER:
                    ticket.payload.synchronize()  # the host waits: the table is about to be written
                ticket.wait()
            except Exception:  # reported when the rows are used
                pass
        return pending

    def catch_up(self, index: int, weight, ticket, ids, rows, staged):
        """Staged rows (deduplicated `rows`, else the table rows `ids()` of each lookup) as the table holds them
        now: the recorded updates' rows read again, or everything after a change of unknown rows. staged may be
        on another device than the table."""
        log = self.logs[index]
        if not log.updates and weight._version == ticket.table_version:
            return staged
        foreign = (weight._version - ticket.table_version) - (log.own_bumps - ticket.own_bumps)
        changed = [r for epoch, r in log.updates if epoch > ticket.epoch]
        oldest = min((t.epoch for t in self.queues.pending(index)), default=log.epoch)  # drop what none needs now
        log.updates = [(e, r) for e, r in log.updates if e > oldest]
        if foreign == 0 and not changed:
            return staged
        table, ids = weight.detach(), rows if rows is not None else ids()
        if foreign != 0:
            self.stats.regathers += 1
            return table[ids].to(staged.device)
        looked_up = ids.reshape(-1)
        # Integer positions found on the table's device (the CPU): a boolean mask
        # sent to an accelerator would make index_put count it there, a host sync.
        pos = torch.isin(looked_up, torch.cat(changed).to(table.device)).nonzero().squeeze(1)
        flat = staged.view(-1, staged.shape[-1])
        flat[pos.to(staged.device, non_blocking=True)] = table[looked_up[pos]].to(staged.device, non_blocking=True)
        self.stats.patched_rows += int(torch.unique(looked_up[pos]).numel())
        return staged
