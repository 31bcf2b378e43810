#!/usr/bin/env python3
"""Static check of the built CUDA kernels (issue 21): per kernel, its registers
and local memory (spills) from `cuobjdump -res-usage`, and its 64-bit division
sites from `cuobjdump -sass`. Fails if a kernel calls the 64-bit div/mod slow
path inside a loop and is not in ALLOWLIST, or if an ALLOWLIST entry is no
longer needed (so the list shrinks as kernels are fixed).

In sm_90 SASS a 64-bit `/` or `%` by a value unknown at compile time becomes a
call (`CALL.REL.NOINC <addr>`) to a subroutine inside the kernel's code whose
body converts the divisor to float with `I2F.U64.RP` (reciprocal estimate,
then ~20 integer instructions of correction). A division site here is one such
call; it is "in a loop" when a later branch jumps back over it. A site
outside every loop runs once per thread (nvcc divides for the trip count of
a grid-stride loop, for one) and does not fail. Columns: regs, stack and
local bytes (local > 0: spills or local arrays), div64 (all sites), inloop.
No GPU needed.

    python scripts/check_sass.py [lib.so ...]   # default: build/cuda/lib.*/engram/{,lib/}*.so
cuobjdump and nvdisasm are found on PATH, else in the pip wheels
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm of this interpreter.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# Kernels (by function name, without namespace or template arguments) allowed
# to call the 64-bit division slow path for now, each with the reason. Remove
# an entry when its kernel is fixed: the check fails on entries not needed.
ALLOWLIST: dict[str, str] = {
    # none left: the layer kernels (2-D grids, stepped pointers), the hash
    # kernels (32-bit or FastMod index math, one thread per head for the
    # constants) and dedup_keys_kernel (a stepped head) were fixed (issue 21)
}


@dataclass
class Kernel:
    mangled: str
    name: str = ""  # demangled
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    div_sites: int = 0  # calls of the 64-bit div/mod slow path
    loop_sites: int = 0  # of which in a loop
    sass: list[str] = field(default_factory=list)


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        nvidia = None
    for root in list(getattr(nvidia, "__path__", [])) if nvidia else []:
        for hit in sorted(glob.glob(os.path.join(root, "**", "bin", name), recursive=True)):
            if os.access(hit, os.X_OK):
                return hit
    sys.exit(f"check_sass: {name} not found on PATH nor in the nvidia-cuda-{name} wheel; "
             f"pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def run(cmd: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 and "does not contain device code" in res.stderr:
        return ""  # a host-only library (_engine)
    if res.returncode != 0:
        sys.exit(f"check_sass: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout


def demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short_name(demangled: str) -> str:
    """Drops the return type and the parameter list (the '(' at template depth 0)."""
    depth = 0
    for i, ch in enumerate(demangled):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            demangled = demangled[:i]
            break
    return demangled[5:] if demangled.startswith("void ") else demangled


def base_name(demangled: str) -> str:
    """`void engram::cuda_layer::gated_short_conv_kernel<float, float>(...)` -> gated_short_conv_kernel"""
    head = demangled.split("(", 1)[0]
    # strip template arguments, innermost first
    while True:
        stripped = re.sub(r"<[^<>]*>", "", head)
        if stripped == head:
            break
        head = stripped
    return head.split()[-1].split("::")[-1] if head.split() else head


RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
RES_VALS = re.compile(r"(REG|STACK|LOCAL):(\d+)")
SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
SASS_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_res_usage(text: str, kernels: dict[str, Kernel]) -> None:
    current = None
    for line in text.splitlines():
        m = RES_FUNC.match(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        if current is not None and "REG:" in line:
            vals = dict((k, int(v)) for k, v in RES_VALS.findall(line))
            current.regs, current.stack, current.local = vals.get("REG"), vals.get("STACK"), vals.get("LOCAL")
            current = None


def parse_sass(text: str, kernels: dict[str, Kernel]) -> None:
    current = None
    for line in text.splitlines():
        m = SASS_FUNC.match(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        if current is not None:
            m = SASS_INSN.search(line)
            if m:
                current.sass.append(f"{m.group(1)} {m.group(2)}")


def count_div_sites(k: Kernel) -> tuple[int, int]:
    """(all, in a loop): calls whose target subroutine (up to its RET)
    converts with I2F.U64.RP. A site is in a loop when a later branch jumps
    back to or above it; the others run once per thread (nvcc's trip count of
    a grid-stride loop is one such)."""
    addr = [int(s.split(" ", 1)[0], 16) for s in k.sass]
    text = [s.split(" ", 1)[1] for s in k.sass]
    index = {a: i for i, a in enumerate(addr)}
    back_edges = []  # (target, source) of backward branches
    for a, t in zip(addr, text):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a:
            back_edges.append((int(m.group(1), 16), a))
    sites = in_loop = 0
    for a, t in zip(addr, text):
        m = re.search(r"CALL\.REL\.NOINC\s+`?\(?0x([0-9a-f]+)", t)
        if not m:
            continue
        i = index.get(int(m.group(1), 16))
        if i is None:
            continue
        for body in text[i:]:
            if "I2F.U64.RP" in body:
                sites += 1
                in_loop += any(lo <= a < hi for lo, hi in back_edges)
                break
            if re.match(r"(@!?U?P\w+\s+)?RET\b", body):
                break
    return sites, in_loop


def main(argv: list[str]) -> int:
    libs = argv or sorted(glob.glob("build/cuda/lib.*/engram/*.so") + glob.glob("build/cuda/lib.*/engram/lib/*.so"))
    if not libs:
        sys.exit("check_sass: no CUDA extension found (build it with scripts/check_cuda_build.sh)")
    cuobjdump = find_tool("cuobjdump")
    nvdisasm = find_tool("nvdisasm")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))

    kernels: dict[str, Kernel] = {}
    for lib in libs:
        parse_res_usage(run([cuobjdump, "-res-usage", lib], env), kernels)
        parse_sass(run([cuobjdump, "-sass", lib], env), kernels)
    kernels = {m: k for m, k in kernels.items() if k.sass or k.regs is not None}
    if not kernels:
        sys.exit(f"check_sass: no kernels in {libs}")
    for k, name in zip(kernels.values(), demangle(list(kernels))):
        k.name = short_name(name)
        k.div_sites, k.loop_sites = count_div_sites(k)

    width = min(100, max(len(k.name) for k in kernels.values()))
    print(f"{'kernel':<{width}} {'regs':>5} {'stack':>6} {'local':>6} {'div64':>6} {'inloop':>6}")
    for k in sorted(kernels.values(), key=lambda k: (-k.loop_sites, -k.div_sites, k.name)):
        name = k.name if len(k.name) <= width else k.name[: width - 3] + "..."
        print(f"{name:<{width}} {k.regs if k.regs is not None else '?':>5} {k.stack if k.stack is not None else '?':>6} "
              f"{k.local if k.local is not None else '?':>6} {k.div_sites:>6} {k.loop_sites:>6}")

    # Only sites in a loop fail: a divide once per thread is cheap.
    failures = []
    dividing = {base_name(k.name) for k in kernels.values() if k.loop_sites}
    for k in kernels.values():
        if k.loop_sites and base_name(k.name) not in ALLOWLIST:
            failures.append(f"{k.name}: {k.loop_sites} call(s) of the 64-bit division slow path in a loop")
    present = {base_name(k.name) for k in kernels.values()}
    for name in ALLOWLIST:
        if name not in dividing:
            why = "has no 64-bit division in a loop left" if name in present else "is not in the build"
            failures.append(f"ALLOWLIST entry {name} {why}: remove it from scripts/check_sass.py")
    spilling = [k.name for k in kernels.values() if k.local]
    print(f"check_sass: {len(kernels)} kernels; 64-bit division sites: {sum(k.div_sites for k in kernels.values())}, "
          f"{sum(k.loop_sites for k in kernels.values())} of them in loops of {len(dividing)} kernels "
          f"(allowlisted: {len(dividing & set(ALLOWLIST))}); {len(spilling)} kernels with local memory (spills)")
    for f in failures:
        print(f"check_sass: FAIL {f}", file=sys.stderr)
    if not failures:
        print("check_sass: OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
