"""The switch that turns the CPU kernels' kept blocks off (for tight memory):
engram.set_cpu_cache_enabled / cpu_cache_enabled and ENGRAM_CPU_CACHE=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import engram

OPS = torch.ops.engram
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_cache_setting():
    was = engram.cpu_cache_enabled()
    yield
    engram.set_cpu_cache_enabled(was)


def big_calls():
    """A 2 MiB hash output and a 2.2 MiB table gradient: sizes the kernels keep when freed."""
    gen = torch.Generator().manual_seed(0)
    lookup = torch.randperm(1000, generator=gen)
    keys = torch.randint(1, 2**40, (2, 3), generator=gen) * 2 + 1
    sizes = torch.tensor([[100_003 + 10 * k for k in range(16)], [200_003 + 10 * k for k in range(16)]])
    ids = torch.randint(0, 1000, (2, 4096), generator=gen)
    rows = torch.randint(0, 9001, (2, 100, 4), generator=gen)
    grad = torch.randn(2, 100, 4, 64, generator=gen)
    return (lambda: OPS.ngram_hash(ids, lookup, keys, sizes, None, 2, "deepseek"),
            lambda: OPS.multihead_embedding_backward(grad, rows, None, 9001))


def test_off_keeps_nothing_and_changes_no_result(restore_cache_setting):
    hash_call, grad_call = big_calls()
    engram.set_cpu_cache_enabled(True)
    engram.empty_cpu_cache()
    on = [hash_call(), grad_call()]
    kept_bytes = sum(t.numel() * t.element_size() for t in on)
    want = [t.clone() for t in on]
    del on
    assert engram.empty_cpu_cache() == kept_bytes  # on: both blocks were kept

    engram.set_cpu_cache_enabled(False)
    assert engram.cpu_cache_enabled() is False
    for _ in range(2):  # the second round would reuse blocks if any were kept
        off = [hash_call(), grad_call()]
        for got, expected in zip(off, want):
            assert torch.equal(got, expected)
        del off
        assert engram.empty_cpu_cache() == 0


def test_turning_off_frees_what_is_kept(restore_cache_setting):
    hash_call, grad_call = big_calls()
    engram.set_cpu_cache_enabled(True)
    engram.empty_cpu_cache()
    hash_call(), grad_call()  # computed and freed at once: both blocks kept now
    engram.set_cpu_cache_enabled(False)
    assert engram.empty_cpu_cache() == 0
    # On again: blocks are kept again.
    engram.set_cpu_cache_enabled(True)
    out = hash_call()
    nbytes = out.numel() * out.element_size()
    del out
    assert engram.empty_cpu_cache() == nbytes


def test_set_cpu_cache_enabled_wants_a_bool(restore_cache_setting):
    with pytest.raises(TypeError, match="set_cpu_cache_enabled: enabled must be a bool, got int"):
        engram.set_cpu_cache_enabled(0)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=300)


def test_environment_variable():
    code = (
        "import torch, engram\n"
        "assert engram.cpu_cache_enabled() is False\n"
        "ids = torch.randint(0, 1000, (2, 4096))\n"
        "keys = torch.ones(2, 3, dtype=torch.long)\n"
        "sizes = torch.full((2, 16), 100_003)\n"
        "torch.ops.engram.ngram_hash(ids, torch.arange(1000), keys, sizes, None, 2, 'deepseek')\n"
        "assert engram.empty_cpu_cache() == 0\n"
        "print('ok')\n"
    )
    done = run_python(code, ENGRAM_CPU_CACHE="0")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    bad = run_python("import engram", ENGRAM_CPU_CACHE="no")
    assert bad.returncode != 0
    assert "ENGRAM_CPU_CACHE='no': expected 0 (keep no freed CPU blocks) or 1" in bad.stderr
