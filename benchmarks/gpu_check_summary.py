"""Writes $OUT/summary.json for benchmarks/gpu_check.sh from what its steps
left so far; run after every step, so a run cut short still has a summary.
Plain Python (no torch): it must work even when the build did not.

    python benchmarks/gpu_check_summary.py --work DIR --out DIR --budget S --elapsed S --rehearsal 0|1

Reads DIR/steps.tsv (one line per step: name, status, rc, seconds, limit,
log, reason), DIR/machine.txt, DIR/smoke*.json, DIR/bench.json, and the
logs in OUT (tests.log: per-test outcomes; sanitizer.log: error counts).
"""

import argparse
import json
import os
import re

CORE_STEPS = ("build", "smoke", "tests", "bench", "memcheck", "initcheck")
# A sanitizer that cannot attach to this GPU says so; that is no finding about engram.
UNAVAILABLE = re.compile(r"Device not supported|Target application returned an error|error 999|"
                         r"Unable to find injection library|CUPTI_ERROR|not supported on this platform", re.I)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_json(path):
    text = read(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def steps(work):
    rows = []
    for line in (read(os.path.join(work, "steps.tsv")) or "").splitlines():
        parts = line.split("\t") + [""] * 7
        name, status, rc, seconds, limit, log, reason = parts[:7]
        row = {"name": name, "status": status, "rc": None if rc in ("-", "") else int(rc),
               "seconds": int(seconds or 0), "limit_s": int(limit or 0), "log": log}
        if reason:
            row["reason"] = reason
        rows.append(row)
    return rows


def smoke(work, name="smoke.json"):
    data = read_json(os.path.join(work, name))
    if not data:
        return None
    items = data.get("items", [])
    failed = [i for i in items if not i["ok"]]
    return {"passed": len(items) - len(failed), "failed": len(failed),
            "failures": {i["name"]: i["error"] for i in failed}}


OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
TEST_ID = re.compile(r"(tests/\S+\.py::\S+)")


def tests(out):
    """Per-test outcomes from a -v log (xdist or not), so that a run killed
    by its timeout still counts what finished; the final line when present."""
    text = read(os.path.join(out, "tests.log"))
    if text is None:
        return None
    outcomes = {}
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):  # the -rfE recap repeats the failures
            continue
        o, t = OUTCOME.search(line), TEST_ID.search(line)
        if o and t:
            outcomes[t.group(1)] = o.group(1)
    counts = {}
    for o in outcomes.values():
        counts[o.lower()] = counts.get(o.lower(), 0) + 1
    result = {"counts": counts,
              "failures": sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR"))[:30]}
    final = re.findall(r"^=+ (.+ in [\d.]+s.*?) =+$", text, re.M)
    if final:
        result["final"] = final[-1]
    return result


def sanitizer(out):
    text = read(os.path.join(out, "sanitizer.log"))
    if text is None:
        return None
    result = {}
    for part in re.split(r"^== (?=memcheck|initcheck)", text, flags=re.M)[1:]:
        tool = part.split(":", 1)[0].strip()
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", part)
        where = []
        for w in re.findall(r"^=+\s+at (\S.*)$", part, re.M):
            w = w.strip()[:160]
            if w not in where:
                where.append(w)
        result[tool] = {"errors": int(errors[-1]) if errors else None, "at": where[:10],
                        "unavailable": bool(UNAVAILABLE.search(part)) and not errors}
    return result


def headline(summary):
    h = {}
    s = summary.get("smoke")
    if s:
        h["smoke"] = f"{s['passed']} of {s['passed'] + s['failed']} passed"
    t = summary.get("tests")
    if t:
        h["tests"] = t.get("final") or ", ".join(f"{n} {k}" for k, n in sorted(t["counts"].items())) + " (cut short)"
    b = summary.get("bench") or {}
    for key, value in b.get("headline", {}).items():
        h[key] = value
    for tool, r in (summary.get("sanitizer") or {}).items():
        if r["unavailable"]:
            h[tool] = "unavailable on this machine"
        else:
            h[tool] = "no report (not run)" if r["errors"] is None else f"{r['errors']} errors"
    return h


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--elapsed", type=int, required=True)
    parser.add_argument("--rehearsal", default="0")
    parser.add_argument("--only", default="", help="the steps this run was asked for (comma list; empty: all)")
    args = parser.parse_args()
    summary = {"rehearsal": args.rehearsal == "1", "budget_s": args.budget, "elapsed_s": args.elapsed,
               "machine": (read(os.path.join(args.work, "machine.txt")) or "").strip().splitlines(),
               "steps": steps(args.work), "smoke": smoke(args.work), "tests": tests(args.out),
               "bench": read_json(os.path.join(args.work, "bench.json")), "sanitizer": sanitizer(args.out)}
    san = summary["sanitizer"] or {}
    for row in summary["steps"]:
        if row["name"] in san and row["status"] == "failed" and san[row["name"]]["unavailable"]:
            row["status"] = "unavailable"
    summary["failed_steps"] = [r["name"] for r in summary["steps"]
                               if r["status"] in ("failed", "timeout")
                               or (r["status"] == "skipped" and r.get("reason") == "budget spent")]
    ran = {r["name"] for r in summary["steps"]}
    wanted = [n for n in CORE_STEPS if not args.only or n in args.only.split(",")]
    summary["pending_steps"] = [n for n in wanted if n not in ran]
    summary["ok"] = not summary["failed_steps"] and not summary["pending_steps"]
    summary["headline"] = headline(summary)
    path = os.path.join(args.out, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written summary


if __name__ == "__main__":
    main()
