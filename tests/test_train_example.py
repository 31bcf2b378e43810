"""Smoke test of examples/train_tiny_lm.py with tiny settings (seconds, not minutes)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_tiny_lm.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--d-model", "32", "--layers", "2", "--heads", "2",
    "--vocab-size", "400", "--max-files", "24", "--eval-every", "3", "--eval-windows", "8",
    "--engram-layers", "0,1", "--engram-vocab-size", "1009", "--engram-dim", "16", "--snippet-tokens", "20",
]


def test_tiny_run_writes_plots_and_metrics(example, tmp_path):
    out = tmp_path / "run"
    metrics = example.main(["--out", str(out), *TINY])
    for name in ("loss_curves.png", "gate_heatmap.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_val_loss", "engram_val_loss", "baseline_params", "engram_params", "steps",
                "wall_seconds", "train_tokens_seen"):
        assert key in saved, key
    assert saved["steps"] == 6
    assert math.isfinite(saved["baseline_val_loss"]) and math.isfinite(saved["engram_val_loss"])
    # Both losses come from the same held-out windows at the same step.
    assert [s for s, _ in saved["val_curves"]["baseline"]] == [s for s, _ in saved["val_curves"]["engram"]] == [3, 6]
    assert saved["engram_params"] == saved["engram_dense_params"] + saved["engram_table_params"]
    assert saved["engram_table_params"] > 0 and saved["engram_dense_params"] > saved["baseline_params"]
    gates = saved["gate_snippet"]["gates"]
    assert sorted(gates) == ["0", "1"]
    assert all(len(g) == len(saved["gate_snippet"]["tokens"]) for g in gates.values())
    assert metrics["engram_val_loss"] == saved["engram_val_loss"]
    assert "table_optim" not in saved  # the default run trains the tables with dense Adam


def test_tiny_run_with_rowwise_table_optimizer(example, tmp_path):
    metrics = example.main(["--out", str(tmp_path / "run"), *TINY, "--table-optim", "rowwise-adagrad"])
    assert metrics["table_optim"] == "rowwise-adagrad"
    memory = metrics["table_optim_memory"]
    # Row-wise Adagrad keeps one float per row; the dense path a gradient and two moments.
    cfg = metrics["engram_config"]
    rows = metrics["engram_table_params"] // (cfg["n_embed_per_ngram"] // cfg["n_head_per_ngram"])
    assert memory["table_bytes"] == 4 * metrics["engram_table_params"]
    assert memory["rowwise_state_bytes"] == 4 * rows
    assert memory["saved_bytes"] == 3 * memory["table_bytes"] - 4 * rows
    assert math.isfinite(metrics["engram_val_loss"])


def test_split_is_by_file(example):
    files = example.stdlib_files(max_files=40)
    train, val = example.split_files(files, 0.2, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(files)
    assert len(val) == 8
    assert not any(os.sep + "test" + os.sep in f or "site-packages" in f for f in files)


def test_same_seed_same_backbone(example):
    import torch

    import engram

    def build(with_engram):
        torch.manual_seed(0)
        m = example.TinyLM(64, 16, 2, 2, 8)
        if with_engram:
            torch.manual_seed(1)
            cfg = engram.EngramConfig(engram_vocab_size=[101, 101], n_embed_per_ngram=8, n_head_per_ngram=2,
                                      layer_ids=[1])
            m.add_engram(cfg, engram.CompressionTable.identity(64))
        return m

    base, eng = build(False).state_dict(), build(True).state_dict()
    assert all(torch.equal(base[k], eng[k]) for k in base)
    assert any(".engram." in k for k in eng)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--engram-layers", "1,9"], "engram-layers"),
        (["--engram-layers", "a"], "engram-layers"),
        (["--val-fraction", "1.5"], "val-fraction"),
        (["--steps", "0"], "steps"),
        (["--vocab-size", "100"], "vocab-size"),
        (["--table-optim", "lamb"], "table-optim"),
        (["--shard-tables"], "table-optim rowwise"),
    ],
)
def test_bad_arguments(example, bad, message, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--out", "x", *bad])
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------
# --shard-tables under torchrun against one process
# --------------------------------------------------------------------------

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SHARD_TINY = [*TINY, "--steps", "5", "--table-optim", "rowwise-adam", "--eval-every", "5"]
RUN_TIMEOUT_S = 90


def _run_all(cmds, timeout=RUN_TIMEOUT_S):
    """Runs the training process trees side by side (start-up, mostly imports, dominates
    and is single-threaded); kills every tree at the timeout (torchrun's workers
    included, so that no orphan holds a pipe open). Returns each run's metrics.json."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    procs = {out: subprocess.Popen([*cmd, "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for out, cmd in cmds.items()}
    deadline = time.monotonic() + timeout
    logs = {}
    try:
        for out, proc in procs.items():
            logs[out], _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        outputs = [p.communicate()[0] or "" for p in procs.values()]
        pytest.fail(f"the runs did not finish in {timeout} s:\n" + "\n".join(outputs))
    for out, proc in procs.items():
        assert proc.returncode == 0, f"{' '.join(cmds[out])} exited with {proc.returncode}:\n{logs[out]}"
    return {out: json.loads((out / "metrics.json").read_text()) for out in cmds}


def _max_gap(a, b):
    return max(max(abs(x - y) for x, y in zip(a["train_losses"][k], b["train_losses"][k])) for k in a["train_losses"])


def test_sharded_torchrun_losses_equal_one_process(tmp_path):
    one = [sys.executable, EXAMPLE, *SHARD_TINY]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", EXAMPLE,
           "--shard-tables", *SHARD_TINY]
    cmds = {tmp_path / f"{n}-{dtype}": [*cmd, "--dtype", dtype]
            for n, cmd in (("one", one), ("two", two)) for dtype in ("float64", "float32")}
    runs = {tuple(out.name.split("-")): metrics for out, metrics in _run_all(cmds).items()}
    sharded = runs["two", "float64"]
    assert sharded["world_size"] == 2 and sharded["shard_tables"] and sharded["dtype"] == "float64"
    assert runs["one", "float64"]["world_size"] == 1
    for name, losses in sharded["train_losses"].items():
        assert len(losses) == 5 and all(math.isfinite(x) for x in losses), (name, losses)
    # float64: the same sums in another order (per-rank means averaged, row gradients
    # summed per rank then over ranks); only rounding separates the runs.
    assert _max_gap(sharded, runs["one", "float64"]) <= 1e-10
    assert sharded["val_curves"].keys() == runs["one", "float64"]["val_curves"].keys()
    for name, curve in sharded["val_curves"].items():
        for (s1, v1), (s2, v2) in zip(curve, runs["one", "float64"]["val_curves"][name]):
            assert s1 == s2 and abs(v1 - v2) <= 1e-10
    # float32 (docs/distributed.md): both float32 runs are roundings of the same exact
    # trajectory, which float64 stands in for; if reordering rounds no worse than the
    # one-process order, |L_2 - L_1| <= |L_2 - L_64| + |L_1 - L_64| <= 2 |L_1 - L_64|.
    # Floor: 4 ulp of the loss, for a step where the one-process run happens to round exactly.
    rounding = _max_gap(runs["one", "float32"], runs["one", "float64"])
    loss = max(max(v) for v in runs["one", "float32"]["train_losses"].values())
    ulp32 = math.ulp(loss) * 2**29  # float32 keeps 23 fraction bits, float64 52
    tolerance = max(2 * rounding, 4 * ulp32)
    gap = _max_gap(runs["two", "float32"], runs["one", "float32"])
    assert gap <= tolerance, (gap, tolerance, rounding)
