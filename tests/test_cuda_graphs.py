"""EngramLayer on CUDA without host syncs: a default-mode training step runs
under torch.cuda.set_sync_debug_mode("error"), is captured as a CUDA graph by
hand and by torch.compile(mode="reduce-overhead"), and compiles with
fullgraph=True. Replays must equal eager.

Every test needs a GPU and a CUDA build of engram; without one they skip.
"""

import pytest
import torch

import engram
from engram import CompressionTable, EngramConfig, EngramLayer

has_cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "engram::context_gate", "CUDA"
)
pytestmark = pytest.mark.skipif(not has_cuda_kernels, reason="needs a CUDA GPU and a CUDA build of engram")

B, T, D, G = 2, 33, 64, 2


def make_layer(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0])
    return EngramLayer(cfg, 0, hidden_size=D, hc_mult=G, compression=CompressionTable.identity(500)).to(
        device="cuda", dtype=dtype
    )


def make_inputs(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, G, D, generator=gen).to(device="cuda", dtype=dtype)
    ids = torch.randint(0, 500, (B, T), generator=gen).cuda()
    return hidden, ids


def grads_of(layer, hidden, ids, seen=None):
    """One step's (output, hidden grad, parameter grads). With `seen`, also
    records there the largest |gradient| reaching the embedding rows."""
    hidden = hidden.detach().requires_grad_()
    layer.zero_grad(set_to_none=False)
    handle = None
    if seen is not None:

        def watch(module, args, out):
            out.register_hook(lambda g: seen.__setitem__("max_term", g.abs().max().item()))

        handle = layer.multi_head_embedding.register_forward_hook(watch)
    try:
        out = layer(hidden, ids)
        out.float().square().mean().backward()
    finally:
        if handle is not None:
            handle.remove()
    return out.detach().clone(), hidden.grad.clone(), [p.grad.clone() for p in layer.parameters()]


def reorder_bound(terms, max_term):
    """Largest difference between two fp32 sums of the same `terms` values in
    different orders, each value at most `max_term` in magnitude: either sum
    is within (terms - 1) * u * sum|x| of the exact one (u = 2**-24), and
    sum|x| <= terms * max_term."""
    return 2 * (terms - 1) * 2.0**-24 * terms * max_term


def assert_same_step(got, want, exact=False, table_atol=None):
    """(output, hidden grad, parameter grads) of two runs of one step. With
    exact, everything must match bit for bit except the fp32 embedding
    table's gradient: atomicAdd sums its repeated rows in whatever order the
    threads arrive, so it may differ by up to `table_atol`."""
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(got[0], want[0], **tolerance)
    torch.testing.assert_close(got[1], want[1], **tolerance)
    for i, (g, w) in enumerate(zip(got[2], want[2], strict=True)):
        if exact and i == 0 and g.dtype == torch.float32:  # multi_head_embedding.embedding.weight
            assert table_atol is not None
            torch.testing.assert_close(g, w, rtol=0, atol=table_atol)
        else:
            torch.testing.assert_close(g, w, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_mode_training_step_has_no_host_sync(dtype):
    layer = make_layer(dtype)
    hidden, ids = make_inputs(dtype)
    grads_of(layer, hidden, ids)  # first call: allocations, error slots, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            hidden_in = hidden.detach().requires_grad_()
            out = layer(hidden_in, ids)
            out.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engram.check_cuda_errors()


def test_inference_forward_captured_by_hand():
    layer = make_layer()
    hidden, ids = make_inputs()
    static_hidden, static_ids = hidden.clone(), ids.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_hidden, static_ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_hidden, static_ids)
        for seed in (2, 3):
            new_hidden, new_ids = make_inputs(seed=seed)
            static_hidden.copy_(new_hidden)
            static_ids.copy_(new_ids)
            graph.replay()
            torch.testing.assert_close(static_out, layer(new_hidden, new_ids), rtol=0, atol=0)


def test_training_step_captured_by_hand():
    layer = make_layer()
    hidden, ids = make_inputs()
    static_hidden = hidden.clone().requires_grad_()
    static_ids = ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer.zero_grad(set_to_none=False)
            layer(static_hidden, static_ids).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=False)
    static_hidden.grad = None
    with torch.cuda.graph(graph):
        static_out = layer(static_hidden, static_ids)
        static_out.square().mean().backward()
    for seed in (2, 3):
        new_hidden, new_ids = make_inputs(seed=seed)
        with torch.no_grad():
            static_hidden.copy_(new_hidden)
        static_ids.copy_(new_ids)
        for p in layer.parameters():
            p.grad.zero_()
        static_hidden.grad.zero_()
        graph.replay()
        replay = (static_out.clone(), static_hidden.grad.clone(), [p.grad.clone() for p in layer.parameters()])
        seen = {}
        want = grads_of(layer, new_hidden, new_ids, seen)
        # A table row takes at most one term per token (the heads' rows are disjoint).
        assert_same_step(replay, want, exact=True, table_atol=reorder_bound(B * T, seen["max_term"]))


@pytest.mark.parametrize("rule", ["adam", "adagrad", "sgd"])
def test_whole_training_step_with_fused_rowwise_update_captured(rule):
    """Forward, backward, the fused row-wise table update inside it and a dense
    optimizer step, captured once as a CUDA graph and replayed over several
    batches: each replay equals an eager twin's step (Adam's step count lives on
    the device: capturable=True), with no host sync while it runs."""
    from engram import optim

    hyper = {"lr": 0.05, "capturable": True} if rule == "adam" else {"lr": 0.05}
    graphed, eager = make_layer(), make_layer()
    graphed_table = optim.make_rowwise(graphed, rule, **hyper)
    optim.make_rowwise(eager, rule, **{k: v for k, v in hyper.items() if k != "capturable"})
    dense = [p for p in graphed.parameters() if p is not graphed.multi_head_embedding.embedding.weight]
    eager_dense = [p for p in eager.parameters() if p is not eager.multi_head_embedding.embedding.weight]
    graphed_opt = torch.optim.SGD(dense, lr=0.1)
    eager_opt = torch.optim.SGD(eager_dense, lr=0.1)
    hidden, ids = make_inputs(seed=1)
    static_hidden, static_ids = hidden.clone(), ids.clone()

    def step(layer, opt, hidden_in, ids_in):
        opt.zero_grad(set_to_none=False)
        loss = layer(hidden_in, ids_in).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    # Warm-up on a side stream (allocations, error slots, cuBLAS), as torch's docs ask; the twin takes the
    # same steps eagerly.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for seed in (11, 12):
            warm_hidden, warm_ids = make_inputs(seed=seed)
            static_hidden.copy_(warm_hidden)
            static_ids.copy_(warm_ids)
            step(graphed, graphed_opt, static_hidden, static_ids)
    torch.cuda.current_stream().wait_stream(side)
    for seed in (11, 12):
        step(eager, eager_opt, *make_inputs(seed=seed))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, graphed_opt, static_hidden, static_ids)
    # Capturing records the kernels without running them: the layer is still at its warm-up state.
    batches = [make_inputs(seed=seed) for seed in (2, 3, 4)]  # copied to the GPU before the sync check
    replays = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for new_hidden, new_ids in batches:
            static_hidden.copy_(new_hidden)
            static_ids.copy_(new_ids)
            graph.replay()
            replays.append((static_loss.clone(), graphed.multi_head_embedding.embedding.weight.detach().clone()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (loss, table), (new_hidden, new_ids) in zip(replays, batches):
        want = step(eager, eager_opt, new_hidden, new_ids)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(table, eager.multi_head_embedding.embedding.weight.detach(), rtol=1e-5, atol=1e-6)
    if rule == "adam":  # counted on the device, once per replay: warm-up 2 + replays 3
        assert int(graphed_table.state[graphed.multi_head_embedding.embedding.weight]["step"]) == 5
    engram.check_cuda_errors()


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = make_layer()
    hidden, ids = make_inputs()
    compiled = torch.compile(layer, fullgraph=True)
    want = grads_of(layer, hidden, ids)
    assert_same_step(grads_of(compiled, hidden, ids), want)


@pytest.mark.parametrize("train", [False, True])
def test_compile_reduce_overhead_replays_equal_eager(train):
    torch._dynamo.reset()
    layer = make_layer()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for seed in range(1, 5):  # warm-up runs, then graph replays
        hidden, ids = make_inputs(seed=seed)
        if train:
            assert_same_step(grads_of(compiled, hidden, ids), grads_of(layer, hidden, ids))
        else:
            with torch.no_grad():
                got = compiled(hidden, ids).clone()
                torch.testing.assert_close(got, layer(hidden, ids))
