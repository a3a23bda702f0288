"""One line per CUDA kernel from a build log made with -Xptxas=-v (MMKERNELS_PTXAS_VERBOSE=1): registers, spill
bytes, stack and shared memory, demangled with c++filt when it is there.   python scripts/ptxas_report.py BUILD.log"""

import re
import shutil
import subprocess
import sys


def kernels(lines):
    name, frame = None, (0, 0, 0)
    for line in lines:
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            name, arch, frame = m.group(1), m.group(2), (0, 0, 0)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            frame = tuple(int(v) for v in m.groups())
            continue
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line.strip())
        if m and name:
            yield name, arch, int(m.group(1)), frame, int(m.group(2) or 0)
            name = None


def demangle(names):
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def main(path):
    rows = list(kernels(open(path, errors="replace")))
    if not rows:
        print("  (no CUDA kernels compiled)")
        return 0
    names = demangle([r[0] for r in rows])
    spilled = 0
    print(f"  {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  arch   kernel")
    for (_, arch, regs, (stack, st, ld), smem), name in zip(rows, names):
        spilled += (st + ld) > 0
        short = re.sub(r"\(.*\)$", "", name.replace("mmk::(anonymous namespace)::", "").replace("void ", ""))
        print(f"  {regs:>4} {f'{st}/{ld}':>11} {stack:>5} {smem:>6}  {arch}  {short}")
    print(f"  {len(rows)} CUDA kernels, max {max(r[2] for r in rows)} registers, {spilled} with spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
