"""Checks the machine code of the per-level CPU kernels in the built op library (engram/lib/libengram_ops.so).

For every wrapper cpu::run_scalar / run_avx2 / run_avx512 (kernels/cpu_isa.h)
in the extension, from `objdump -d`:
  - scalar: no VEX or EVEX instruction (runs on baseline x86-64);
  - avx2:   256-bit registers, no 512-bit or AVX-512-only register;
  - avx512: 512-bit or AVX-512-only registers;
  - every kernel and helper inlined: calls only into the C/C++ runtime and
    libm, or to the helpers that stay out of line on purpose (ENGRAM_NOINLINE).
This covers the levels a machine cannot run (e.g. AVX-512 on a CPU without
it). Needs binutils' objdump; GCC x86-64 builds only.

    python scripts/check_isa_code.py [path/to/libengram_ops.so]
"""

import glob
import os
import re
import subprocess
import sys

# Calls allowed inside a wrapper: allocation, memset, libm, exceptions, and
# the ENGRAM_NOINLINE helpers.
ALLOWED_CALLS = re.compile(
    r"^(operator new|operator delete|memset|memcpy|memmove|exp|expf|sqrt|sqrtf|fmax|fmaxf|_Unwind_Resume"
    r"|std::__throw_\w+|void engram::\(anonymous namespace\)::sigmoid_block<"
    # The AVX2 hash reduction (kernels/hash_cpu.h): GCC keeps it out of line
    # (its own target attribute); it is compiled with the avx2 feature set.
    r"|void engram::cpu::Avx2Reducer<)"
)
WRAPPER = re.compile(r"^void engram::cpu::run_(scalar|avx2|avx512)<")
AVX512_ONLY = re.compile(r"%zmm|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|%k[1-7]\b|\{1to\d+\}")


def functions(path):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True,
                         check=True).stdout
    name, body = None, []
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            if name:
                yield name, body
            name, body = header.group(1), []
        elif name and "\t" in line:
            body.append(line.split("\t", 1)[1].strip())
    if name:
        yield name, body


def check(path):
    problems, counts = [], {"scalar": 0, "avx2": 0, "avx512": 0}
    for name, body in functions(path):
        match = WRAPPER.match(name)
        if not match or "[clone .cold]" in name:
            continue
        level = match.group(1)
        counts[level] += 1
        text = "\n".join(body)
        short = name[:160]
        vex = sum(1 for insn in body if insn.startswith("v"))
        if level == "scalar" and vex:
            problems.append(f"{short}: {vex} VEX/EVEX instructions in the scalar version")
        if level == "avx2" and (AVX512_ONLY.search(text) or "%ymm" not in text):
            problems.append(f"{short}: the avx2 version uses AVX-512 registers or no 256-bit ones")
        if level == "avx512" and not AVX512_ONLY.search(text):
            problems.append(f"{short}: the avx512 version uses no AVX-512 register")
        for insn in body:
            call = re.match(r"call\s+[0-9a-f]+\s+<(.*)>$", insn)
            if call:
                target = re.sub(r"@plt$", "", call.group(1))
                if not ALLOWED_CALLS.match(target) and not target.startswith(name.split("(")[0]):
                    problems.append(f"{short}: calls {target[:160]} (not inlined)")
    if not all(counts.values()):
        problems.append(f"wrappers found per level: {counts}; expected some of each (a GCC x86-64 build)")
    return counts, problems


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sys.argv[1:] or glob.glob(os.path.join(root, "engram", "lib", "libengram_ops.so"))
    if len(paths) != 1:
        sys.exit(f"check_isa_code: expected engram/lib/libengram_ops.so, found {paths}; pass its path")
    counts, problems = check(paths[0])
    for p in problems:
        print("check_isa_code:", p)
    if problems:
        sys.exit(f"check_isa_code: {len(problems)} problem(s) in {paths[0]}")
    print(f"check_isa_code: {paths[0]}: {counts} per-level kernel versions, each with its level's instructions "
          "and every helper inlined")


if __name__ == "__main__":
    main()
