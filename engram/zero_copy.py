"""The zero-copy path of engram.Prefetcher (CUDA, pinned "host" tables): a kernel (engram::gather_rows) reads
the rows straight from host memory over UVA on a side stream, with one event per layer and batch; the layer's
stream waits on its own event only, and the host never waits."""

from __future__ import annotations

import torch

from . import _loader

_engine = _loader.load("_engine")
_ops = torch.ops.engram


def gather(streams: dict, table: torch.Tensor, hashed: torch.Tensor, offsets: torch.Tensor):
    """Launches the gather of one layer's rows on the side stream of hashed's device; returns its ticket
    (payload: the event). No host sync."""
    if hashed.device not in streams:
        streams[hashed.device] = torch.cuda.Stream(hashed.device)
    stream = streams[hashed.device]
    stream.wait_stream(torch.cuda.current_stream(hashed.device))  # the hash ids are computed there
    with torch.cuda.stream(stream):
        # Rows are in range by construction (hash mod each head's prime, plus that head's offset): the kernel's
        # range check (a host sync) is skipped.
        out = _ops.gather_rows(table.detach(), hashed + offsets, False)
        event = torch.cuda.Event()
        event.record(stream)
    hashed.record_stream(stream)  # allocated on the compute stream, read on the side stream
    ticket = _engine.GatherTicket.device_gather(out)
    ticket.payload = event
    return ticket


def use(ticket, device: torch.device) -> torch.Tensor:
    """The rows of a device gather, with the current stream made to wait on its event."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(ticket.payload)
    rows = ticket.wait().staged
    rows.record_stream(stream)  # allocated on the side stream
    return rows
