"""Static efficiency report of the numba backend's kernels, from the machine code, without a GPU.

    python -m gpurnn.kernels.sass [80 90] [--json]

Compiles every kernel (numba_cuda_ptx.compile_all: Numba -> PTX, per target and dtype), assembles each PTX with
ptxas (`-c`: the grid barrier's runtime is linked only at load time) and disassembles it with nvdisasm, then
prints per target, dtype and kernel: registers per thread, spill bytes (stores + loads), stack frame bytes,
static shared memory bytes, PTX float64 instructions, and for the persistent kernels the SASS instructions per
FMA of the hot loop (FFMA for float32, DFMA for float64). The hot loop is the single-block loop (one label, one
backward branch, nothing else branching) with the most FMAs: the unrolled body of the dot-product loop, not its
remainder. --json prints one JSON object per kernel instead of the table.

ptxas and nvdisasm come from NVIDIA's pip wheels (nvidia-cuda-nvcc, nvidia-cuda-nvdisasm: the `test` extra),
else from PATH; the ptxas must be at least as new as the NVVM that wrote the PTX (the wheels match).
Run it with NUMBA_ENABLE_CUDASIM unset or 0 (compile_ptx does not exist in the simulator).
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor


def tool(name):
    """Path of an NVIDIA command-line tool: inside the installed `nvidia` wheels first, then on PATH."""
    try:
        import nvidia
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "*", "bin", name)))
        if found:
            return found[-1]
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found: pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm "
                                f"(the test extra) or put a CUDA toolkit on PATH")
    return path


def resources(ptxas_log):
    """Registers, spill bytes, stack frame bytes and static shared memory bytes from `ptxas -v` of one kernel."""
    def number(pattern):
        return sum(int(m) for m in re.findall(pattern, ptxas_log))
    return {"registers": max([int(m) for m in re.findall(r"Used (\d+) registers", ptxas_log)] or [0]),
            "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "shared_bytes": number(r"(\d+) bytes smem")}


def instructions(sass):
    """nvdisasm output as a list of ("label", name) and ("ins", text) in program order."""
    out = []
    for raw in sass.splitlines():
        line = re.sub(r"/\*[0-9a-f]+\*/", "", raw).strip()
        if re.fullmatch(r"\.L_x_\d+:", line):
            out.append(("label", line[:-1]))
        elif line and not line.startswith((".", "//")) and not line.endswith(":"):
            out.append(("ins", line.rstrip(" ;")))
    return out


def hot_loop(sass, fma):
    """(instructions, FMAs) of the single-block loop with the most `fma` instructions, or None."""
    code = instructions(sass)
    labels = {name: i for i, (kind, name) in enumerate(code) if kind == "label"}
    best = None
    for end, (kind, text) in enumerate(code):
        target = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text) if kind == "ins" else None
        start = labels.get(target.group(1), end) if target else end
        if start >= end:
            continue                                                  # not a backward branch
        body = code[start + 1:end + 1]
        if any(k == "label" for k, _ in body) or any(re.search(r"\b(BRA|EXIT|RET|CALL)\b", t) for _, t in body[:-1]):
            continue                                                  # more than one basic block
        fmas = sum(bool(re.search(rf"\b{fma}\b", t)) for _, t in body)
        if fmas and (best is None or fmas > best[1]):
            best = (len(body), fmas)
    return best


def analyse(ptx, cc, dtype, name, function, workdir):
    """The report row of one kernel: ptxas resources, its PTX .entry line and float64 instruction count, and the
    hot loop of the persistent kernels."""
    stem = os.path.join(workdir, f"sm{cc[0]}{cc[1]}_{dtype}_{name}")
    with open(stem + ".ptx", "w") as f:
        f.write(ptx)
    arch = f"sm_{cc[0]}{cc[1]}"
    log = subprocess.run([tool("ptxas"), f"-arch={arch}", "-c", "-v", "-o", stem + ".cubin", stem + ".ptx"],
                         capture_output=True, text=True, check=True).stderr
    lines = ptx.splitlines()
    entry = [line.strip() for line in lines if ".entry" in line and function in line]
    row = {"target": arch, "dtype": dtype, "kernel": name, **resources(log),
           "f64_ops": sum(".f64" in line for line in lines), "entry": entry[0] if entry else None}
    if name.startswith("persistent"):
        sass = subprocess.run([tool("nvdisasm"), "-c", stem + ".cubin"], capture_output=True, text=True,
                              check=True).stdout
        loop = hot_loop(sass, "FFMA" if dtype == "float32" else "DFMA")
        row["hot_loop"] = {"instructions": loop[0], "fmas": loop[1]} if loop else None
    return row


def report(ccs):
    """Yield one row (a dict) per target, dtype and kernel, in compile order. ptxas and nvdisasm of one kernel
    run in a worker thread while Numba compiles the next."""
    from .numba_cuda_ptx import compile_all
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max_workers=2) as pool:
        rows = [pool.submit(analyse, ptx, cc, dtype, name, function, workdir)
                for cc, dtype, name, function, ptx in compile_all(ccs)]
        for row in rows:
            yield row.result()


def table_line(row):
    loop = row.get("hot_loop")
    per_fma = f"{loop['instructions'] / loop['fmas']:.2f} ({loop['instructions']}/{loop['fmas']})" if loop else "-"
    return (f"{row['target']:6} {row['dtype']:8} {row['kernel']:26} {row['registers']:5} {row['spill_bytes']:6} "
            f"{row['stack_bytes']:6} {row['shared_bytes']:6}  {per_fma}")


def main(argv):
    as_json = "--json" in argv
    ccs = [(int(a[:-1]), int(a[-1])) for a in argv if a != "--json"] or [(8, 0), (9, 0)]
    if not as_json:
        print(f"{'target':6} {'dtype':8} {'kernel':26} {'regs':>5} {'spill':>6} {'stack':>6} {'smem':>6}  "
              f"hot-loop instructions per FMA")
    for row in report(ccs):
        print(json.dumps(row) if as_json else table_line(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
