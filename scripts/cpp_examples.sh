#!/usr/bin/env bash
# The C++ examples, end to end, on a fresh clone after `pip install -e .`:
#  1. builds examples/cpp (find_package(Torch), find_package(engram), Ninja);
#  2. exports two small models with Engram layers (torch.export + an
#     AOTInductor package; the Engram tables are runtime inputs, written as
#     .npy files) and decodes greedily in Python eager:
#     examples/export_tiny_lm.py (the tiny LM of train_tiny_lm.py) and, when
#     transformers is installed, examples/export_hf_decoder.py (a transformers
#     Llama with engram.integrations' layers);
#  3. runs examples/cpp/generate on each package, outside Python, and fails
#     unless its tokens equal the Python eager tokens;
#  4. checks that a table of another shape, a sequence longer than the
#     package takes and a package of another op library ABI version are
#     refused with a message naming what differs.
# Prints the export and AOTInductor compile times, the package size against
# the table size and the C++ against the Python forward times. ~1-2 min on 2
# cores. Output under build/cpp_examples (CPP_EXAMPLES_OUT to change);
# CPP_EXAMPLES_THREADS (default 1: stable timings on a shared machine) sets
# the threads of both Python and C++.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${CPP_EXAMPLES_OUT:-build/cpp_examples}
threads=${CPP_EXAMPLES_THREADS:-1}
export PATH=/usr/lib/ccache:$PATH
mkdir -p "$out"

echo "== build examples/cpp"
prefix="$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)');$(python3 -c 'import engram; print(engram.cmake_prefix_path)')"
launcher=()
command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S examples/cpp -B "$out/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  "${launcher[@]}" > "$out/cmake_configure.log" 2>&1 || { cat "$out/cmake_configure.log"; exit 1; }
cmake --build "$out/cmake"
generate=$out/cmake/generate

# The C++ program runs without Python: no PYTHON* variables reach it.
cpp() { env $(env | grep -o '^PYTHON[A-Za-z0-9_]*' | sed 's/^/-u /') timeout 300 "$generate" "$@"; }
metric() { python3 -c "import json, sys; m = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'m': m}))" "$@"; }

# decode_and_compare RUN PACKAGE EXPORT_SCRIPT ARGS...: runs generate on RUN's
# package with RUN's prompt and fails unless its tokens equal RUN's Python
# eager tokens; then times one forward pass of the decoded ids in rounds of
# C++, C++ with glibc's default malloc policy and Python (EXPORT_SCRIPT ARGS
# --time-only, a fresh process), back to back so that all see the same load
# of a shared machine, and prints the numbers (the best round of each).
decode_and_compare() {
  local run=$1 package=$2 prompt new_tokens full round
  shift 2
  prompt=$(metric "$run/export_metrics.json" "';'.join(','.join(map(str, r)) for r in m['prompt'])")
  full=$(metric "$run/export_metrics.json" "';'.join(','.join(map(str, r)) for r in m['eager_tokens'])")
  new_tokens=$(metric "$run/export_metrics.json" "m['new_tokens']")
  cpp "$run/$package" "$run/tables.json" "$prompt" "$new_tokens" --threads "$threads" --repeats 1 \
    | tee "$run/cpp_stdout.txt"
  rm -f "$run"/timing_*.txt
  for round in 1 2 3; do
    cpp "$run/$package" "$run/tables.json" "$full" 0 --threads "$threads" --repeats 50 | tail -1 >> "$run/timing_cpp.txt"
    cpp "$run/$package" "$run/tables.json" "$full" 0 --threads "$threads" --repeats 50 --default-malloc \
      | tail -1 >> "$run/timing_cpp_default_malloc.txt"
    timeout 300 python3 "$@" --out "$run" --threads "$threads" --timing-repeats 50 --time-only 2> /dev/null \
      | tail -1 >> "$run/timing_python.txt"
  done
  python3 - "$run" <<'EOF'
import json, os, re, sys
run = sys.argv[1]
m = json.load(open(os.path.join(run, "export_metrics.json")))
text = open(os.path.join(run, "cpp_stdout.txt")).read()
rows = [[int(v) for v in line.split(":", 1)[1].split()] for line in text.splitlines() if line.startswith("tokens[")]
if rows != m["eager_tokens"]:
    sys.exit(f"FAIL: C++ tokens ({run})\n  {rows}\ndiffer from the Python eager tokens\n  {m['eager_tokens']}")


def cpp_times(name):
    times = []
    for line in open(os.path.join(run, name)):
        forward = re.match(r"forward \[(.*)\]: median ([0-9.e+-]+) ms", line)
        if forward is None or [int(v) for v in forward.group(1).split(",")] != m["forward_shape"]:
            sys.exit(f"FAIL: {run}/{name}: {line!r} is not a forward time of shape {m['forward_shape']}")
        times.append(float(forward.group(2)))
    return times


cpp_ms, cpp_default_ms = cpp_times("timing_cpp.txt"), cpp_times("timing_cpp_default_malloc.txt")
python = [json.loads(line) for line in open(os.path.join(run, "timing_python.txt"))]
if len(python) != len(cpp_ms) or any(p["shape"] != m["forward_shape"] for p in python):
    sys.exit(f"FAIL: {run}/timing_python.txt: expected {len(cpp_ms)} timings of shape {m['forward_shape']}")
eager_ms, package_ms = [p["eager_ms"] for p in python], [p["package_ms"] for p in python]
mib = 2 ** 20
print(f"C++ tokens == Python eager tokens ({len(rows)} x {m['new_tokens']} new; smallest top-1 - top-2 logit gap "
      f"{m['min_top2_logit_gap']:.3g}, max |eager - package| logit {m['logits_max_abs_diff']:.2g})")
print(f"-- numbers ({run})")
print(f"export (torch.export)        {m['export_seconds']:.1f} s")
print(f"AOTInductor compile+package  {m['compile_seconds']:.1f} s")
print(f"package                      {m['package_bytes'] / mib:.2f} MiB; Engram tables (not in it) "
      f"{m['table_bytes'] / mib:.2f} MiB; package / tables = {m['package_bytes'] / m['table_bytes']:.3f}")
print(f"forward pass {m['forward_shape']}, {python[0]['threads']} thread(s), median of {python[0]['repeats']}, "
      f"best of {len(python)} rounds (all rounds):")
show = lambda ts: f"{min(ts):.3f} ms ({', '.join(f'{t:.3f}' for t in ts)})"
print(f"  C++ package                {show(cpp_ms)}; C++ / Python eager = {min(cpp_ms) / min(eager_ms):.2f}")
print(f"  C++, glibc default malloc  {show(cpp_default_ms)}")
print(f"  Python package             {show(package_ms)}")
print(f"  Python eager               {show(eager_ms)}")
EOF
}

echo "== the tiny LM: export (small: the AOTInductor compile dominates), Python eager decoding"
tiny=$out/tiny_lm
rm -rf "$tiny"
# reference init: untrained, the Engram branch then steers the tokens, so
# equal tokens mean equal table lookups (the scaled init decodes one token
# over and over).
tiny_lm=(examples/export_tiny_lm.py --vocab-size 512 --d-model 64 --layers 2 --heads 2 --max-len 64
  --engram-layers 1 --engram-vocab-size 100003 --engram-dim 32 --engram-heads 4 --max-batch 4 --prompt-len 8
  --new-tokens 24 --decode-batch 2 --engram-init reference)
timeout 900 python3 "${tiny_lm[@]}" --out "$tiny" --threads "$threads" --timing-repeats 50 2>&1 \
  | grep -v "greedy decoding (eager and package):"
echo "== the tiny LM: C++ greedy decoding"
decode_and_compare "$tiny" tiny_lm.pt2 "${tiny_lm[@]}"

if python3 -c "import transformers" 2> /dev/null; then
  echo "== a transformers Llama with Engram layers: export, Python eager decoding"
  hf=$out/hf_decoder
  rm -rf "$hf"
  timeout 900 python3 examples/export_hf_decoder.py --out "$hf" --threads "$threads" --timing-repeats 50 2>&1 \
    | grep -v "greedy decoding (eager and package):"
  echo "== a transformers Llama with Engram layers: C++ greedy decoding"
  decode_and_compare "$hf" model.pt2 examples/export_hf_decoder.py
else
  echo "== transformers is not installed: skipping the Hugging Face decoder (pip install transformers)"
fi

echo "== mismatches are refused"
prompt=$(metric "$tiny/export_metrics.json" "';'.join(','.join(map(str, r)) for r in m['prompt'])")
# A table of another Engram configuration: one row fewer.
python3 - "$tiny" <<'EOF'
import json, os, sys
import numpy as np
run = sys.argv[1]
manifest = json.load(open(os.path.join(run, "tables.json")))
first = manifest["tables"][0]
table = np.load(os.path.join(run, first["path"]), mmap_mode="r")
np.save(os.path.join(run, "wrong_shape.npy"), np.ascontiguousarray(table[:-1]))
manifest["tables"][0] = {"name": first["name"], "path": "wrong_shape.npy"}
json.dump(manifest, open(os.path.join(run, "tables_wrong_shape.json"), "w"))
print(f"{first['name']}: {list(table.shape)} -> {[table.shape[0] - 1, table.shape[1]]}")
EOF
expect_refusal() {  # expect_refusal WHAT PATTERN ARGS...: generate must exit 1 with PATTERN on stderr
  local what=$1 pattern=$2 rc=0
  shift 2
  cpp "$@" > /dev/null 2> "$tiny/refusal.txt" || rc=$?
  if [ "$rc" -ne 1 ] || ! grep -qE "$pattern" "$tiny/refusal.txt"; then
    echo "FAIL: $what: exit $rc (expected 1), stderr:"; cat "$tiny/refusal.txt"; exit 1
  fi
  echo "$what (exit $rc): $(cat "$tiny/refusal.txt")"
}
table_name=$(metric "$tiny/tables.json" "m['tables'][0]['name']")
expect_refusal "a table of another shape" \
  "table '${table_name//./\\.}' .* of shape \[[0-9]+, [0-9]+\]; the package .* table of shape \[[0-9]+, [0-9]+\]" \
  "$tiny/tiny_lm.pt2" "$tiny/tables_wrong_shape.json" "$prompt" 1
expect_refusal "a sequence longer than the package takes" \
  "PROMPT of [0-9]+ ids \+ NEW_TOKENS 1000 = [0-9]+ ids; the package .* takes sequences of up to 64 \(export's max_seq\)" \
  "$tiny/tiny_lm.pt2" "$tiny/tables.json" "$prompt" 1000

# A package of another op library ABI version: the same package with its
# metadata's engram.ops_abi_version changed (AOTInductor reads the metadata
# from the package's *_metadata.json files).
python3 - "$tiny/tiny_lm.pt2" "$tiny/other_abi.pt2" <<'EOF'
import json, sys, zipfile
src, dst = sys.argv[1:]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for item in zin.infolist():
        data = zin.read(item)
        if item.filename.endswith("_metadata.json"):
            meta = json.loads(data)
            meta["engram.ops_abi_version"] = "999"
            data = json.dumps(meta).encode()
        zout.writestr(item, data)
EOF
expect_refusal "a package of another op library ABI version" \
  "exported for engram op library ABI version 999 .*; the loaded op library libengram_ops\.so has version [0-9]+" \
  "$tiny/other_abi.pt2" "$tiny/tables.json" "$prompt" 1
# engram.export.load_package refuses it too.
python3 - "$tiny/other_abi.pt2" <<'EOF'
import sys
import engram.export as ex
try:
    ex.load_package(sys.argv[1])
except ValueError as err:
    assert "op library ABI version 999" in str(err), err
    print(f"engram.export.load_package: ValueError: {err}")
else:
    sys.exit("FAIL: engram.export.load_package accepted a package of another op library ABI version")
EOF
echo "== C++ examples: OK"
