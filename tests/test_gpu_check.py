"""benchmarks/gpu_check.sh, rehearsed on the CPU (its GPU steps stubbed): the
steps run in order, a hanging step is stopped by its own limit and the rest
still run, a spent budget skips steps instead of overrunning, and
summary.json says all of it. A lent GPU gives one run of about 8 minutes:
the script must not find out there that it hangs or reports nothing.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check_summary  # noqa: E402

STEPS = ["build", "smoke", "tests", "bench", "memcheck", "initcheck"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the GPU check is a bash script that needs coreutils' timeout")


def rehearse(tmp_path, timeout=240, **env):
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "ENGRAM_GPU_CHECK_REHEARSAL": "1", "TMPDIR": str(tmp_path), **env}
    result = subprocess.run(["bash", SCRIPT], env=environment, capture_output=True, text=True, timeout=timeout)
    with open(out / "summary.json") as f:
        return result, json.load(f), out


def test_rehearsal_survives_a_hanging_step(tmp_path):
    # The tests step hangs: its 3-second limit stops it, the steps after it
    # still run, and the run fails naming it.
    result, summary, out = rehearse(tmp_path, ENGRAM_GPU_CHECK_HANG="tests", ENGRAM_GPU_CHECK_LIMIT_tests="3")
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {s["name"]: s for s in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert steps["tests"]["status"] == "timeout" and steps["tests"]["limit_s"] == 3
    assert steps["tests"]["seconds"] <= 10
    assert all(steps[n]["status"] == "ok" for n in STEPS if n != "tests"), summary["steps"]
    assert summary["failed_steps"] == ["tests"] and summary["ok"] is False
    # The smoke script really ran (CPU against CPU) and every item passed.
    assert summary["smoke"]["failed"] == 0 and summary["smoke"]["passed"] >= 15
    assert summary["rehearsal"] is True
    # Logs as they went, and no more files than the device tool hands back.
    files = sorted(p.name for p in out.iterdir())
    assert {"summary.json", "build.log", "smoke.log", "tests.log", "bench.log", "sanitizer.log"} <= set(files)
    assert len(files) <= 8, files
    assert "smoke: " in (out / "smoke.log").read_text()
    assert not list(tmp_path.glob("engram_gpu_check.*")), "the work folder was left behind"


def test_spent_budget_skips_steps_instead_of_overrunning(tmp_path):
    # 12 s cannot hold what each step must leave for the later ones (the
    # build 200 s, the smoke script 160 s, ...): those are skipped at once,
    # only the last step (it leaves nothing) may still run.
    result, summary, _ = rehearse(tmp_path, timeout=120, ENGRAM_GPU_CHECK_SECONDS="12")
    assert result.returncode == 1
    assert [s["name"] for s in summary["steps"]] == STEPS
    for s in summary["steps"][:-1]:
        assert s["status"] == "skipped" and s["reason"] == "budget spent", s
    assert summary["steps"][-1]["status"] in ("ok", "skipped")
    assert summary["failed_steps"][:5] == STEPS[:5] and summary["elapsed_s"] <= 12


def test_steps_can_be_rerun_alone(tmp_path):
    result, summary, out = rehearse(tmp_path, ENGRAM_GPU_CHECK_STEPS="build,memcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [s["name"] for s in summary["steps"]] == ["build", "memcheck"]
    assert summary["ok"] is True and not (out / "smoke.log").exists()


def test_summary_counts_tests_from_a_log_cut_short(tmp_path):
    # pytest -v with xdist, killed before its final line: what finished counts.
    (tmp_path / "tests.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_cuda.py::test_a[1] \n"
        "[gw1] [ 20%] FAILED tests/test_cuda.py::test_b \n"
        "tests/test_optim_cuda.py::test_c SKIPPED (needs a GPU) [ 30%]\n"
        "[gw0] [ 40%] PASSED tests/test_layer_cuda.py::test_d \n"
    )
    tests = gpu_check_summary.tests(str(tmp_path))
    assert tests["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert tests["failures"] == ["tests/test_cuda.py::test_b"] and "final" not in tests
    with open(tmp_path / "tests.log", "a") as f:
        f.write("FAILED tests/test_cuda.py::test_b - AssertionError\n"
                "=================== 1 failed, 2 passed, 1 skipped in 12.30s ===================\n")
    tests = gpu_check_summary.tests(str(tmp_path))
    assert tests["counts"]["failed"] == 1 and tests["final"] == "1 failed, 2 passed, 1 skipped in 12.30s"


def test_summary_reads_sanitizer_reports(tmp_path):
    (tmp_path / "sanitizer.log").write_text(
        "== memcheck: bash gpu_check.sh --fn sanitize memcheck (limit 60 s)\n"
        "========= Invalid __global__ read of size 16 bytes\n"
        "=========     at void engram::cuda::gather_rows_kernel<uint4>(...)+0x1c0 in cuda_kernels.cuh:300\n"
        "========= ERROR SUMMARY: 1 error\n"
        "== initcheck: bash gpu_check.sh --fn sanitize initcheck (limit 60 s)\n"
        "========= Error: Device not supported\n"
    )
    report = gpu_check_summary.sanitizer(str(tmp_path))
    assert report["memcheck"]["errors"] == 1 and not report["memcheck"]["unavailable"]
    assert "gather_rows_kernel" in report["memcheck"]["at"][0]
    assert report["initcheck"] == {"errors": None, "at": [], "unavailable": True}
