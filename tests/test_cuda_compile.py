"""The CUDA C kernels compile for real targets without a GPU, under the names the CuPy backend asks for.

The source text, options and name expressions are the ones ``cupy_raw`` hands to ``cupy.RawModule``. NVRTC (the
``nvidia-cuda-nvrtc`` wheel of the test extra, through ``cuda.bindings``) reports each name expression's lowered
name; ``nvcc``, where it is on PATH, compiles the same source with every instantiation referenced from host code.
Either way each kernel must appear in the cubin's symbols.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from gpurnn.kernels import ACTIVATIONS, CELLS, cupy_raw

ARCHS = ("sm_80", "sm_90")


def nvrtc_or_none():
    try:
        from cuda.bindings import nvrtc
        nvrtc.nvrtcVersion()
        return nvrtc
    except Exception:
        return None


COMPILERS = {"nvrtc": nvrtc_or_none() is not None, "nvcc": shutil.which("nvcc") is not None}


def symbols(cubin):
    """The NUL-terminated strings of a cubin: its symbol names among them."""
    return set(cubin.split(b"\0"))


def check_nvrtc(nvrtc, result, prog, what):
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        pytest.fail(f"NVRTC {what} failed ({result.name}):\n{log.decode(errors='replace')}")


def nvrtc_build(code, names, arch, ptx=False):
    """(the cubin, or with `ptx` the PTX, and {name expression: lowered name}) of `code` compiled by NVRTC with the
    backend's options for `arch`."""
    nvrtc = nvrtc_or_none()
    result, prog = nvrtc.nvrtcCreateProgram(code.encode(), b"gpurnn_kernels.cu", 0, [], [])
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        for name in names:
            (result,) = nvrtc.nvrtcAddNameExpression(prog, name.encode())
            check_nvrtc(nvrtc, result, prog, f"adding {name}")
        options = [o.encode() for o in (*cupy_raw.OPTIONS, f"-arch={arch}")]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        check_nvrtc(nvrtc, result, prog, "compilation")
        what, get_size, get = (("PTX", nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if ptx else
                               ("cubin", nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        result, size = get_size(prog)
        out = b" " * size
        (result,) = get(prog, out)
        check_nvrtc(nvrtc, result, prog, f"getting the {what}")
        lowered = {}
        for name in names:
            result, lowered[name] = nvrtc.nvrtcGetLoweredName(prog, name.encode())
            check_nvrtc(nvrtc, result, prog, f"lowering {name}")
        return out, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_nvrtc(arch):
    """{name expression: whether its lowered name is a symbol of the cubin}."""
    cubin, lowered = nvrtc_build(cupy_raw.source(), cupy_raw.kernel_names(), arch)
    found = symbols(cubin)
    return {name: low in found for name, low in lowered.items()}


def mangled_prefix(name):
    """Itanium-mangled start of a kernel template instantiation: stem<float, Tanh> -> _Z<n>stemIf4TanhE,
    stem<double, true> -> _Z<n>stemIdLb1EE."""
    stem, args = re.fullmatch(r"(\w+)<(.*)>", name).groups()
    code = {"float": "f", "double": "d", "false": "Lb0E", "true": "Lb1E"}
    parts = [code.get(a, f"{len(a)}{a}") for a in (s.strip() for s in args.split(","))]
    return f"_Z{len(stem)}{stem}I{''.join(parts)}E".encode()


def compile_nvcc(arch, tmp_path):
    """{name expression: whether its mangled name is a symbol of the cubin}."""
    names = cupy_raw.kernel_names()
    refs = "".join(f"    (void*)&{name},\n" for name in names)
    src = tmp_path / "gpurnn_kernels.cu"
    src.write_text(f"{cupy_raw.source()}\nvoid* const instantiations[] = {{\n{refs}}};\n")
    out = tmp_path / "gpurnn_kernels.cubin"
    run = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", *cupy_raw.OPTIONS, "-diag-suppress", "177",
                          "-o", str(out), str(src)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"nvcc failed:\n{run.stderr}")
    found = symbols(out.read_bytes())
    return {name: any(s.startswith(mangled_prefix(name)) for s in found) for name in names}


def test_a_compiler_is_present():
    assert any(COMPILERS.values()), "neither NVRTC (pip install nvidia-cuda-nvrtc cuda-bindings) nor nvcc found"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compiler", sorted(COMPILERS))
def test_every_instantiation_compiles_under_its_name(compiler, arch, tmp_path):
    if not COMPILERS[compiler]:
        pytest.skip(f"{compiler} is not installed here; the other compiler covers this check")
    present = compile_nvrtc(arch) if compiler == "nvrtc" else compile_nvcc(arch, tmp_path)
    missing = [name for name, ok in present.items() if not ok]
    assert not missing, f"kernels missing from the {arch} cubin: {missing}"


def test_names_cover_every_kernel_and_call():
    """Every __global__ template is instantiated, and every kernel the sweeps launch is in the one list."""
    names = cupy_raw.kernel_names()
    assert len(names) == len(set(names))
    defined = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", cupy_raw.source()))
    assert {n.split("<")[0] for n in names} == defined
    wanted = set()
    for dtype in ("float32", "float64"):
        for cell in CELLS:
            for ln, proj in ((False, False), (True, False), (False, True), (True, True)):
                wanted.update(cupy_raw.step_kernels(cell, dtype, ln, proj))     # the flags a cell has
        wanted.update(cupy_raw.variant_kernels(dtype))
        for act in ("tanh", "relu", "sigmoid"):
            for out_act in ACTIVATIONS:
                wanted.update(cupy_raw.jordan_kernels(act, out_act, dtype))
    assert wanted == set(names)
    # per dtype: each Elman cell's forward and backward, the GRU's with and without LN, the LSTM's with and without
    # LN and the projection, the variants' 3 kernels; Jordan's hidden forward and backward per activation and output
    # forward per output activation; its output backward is the Elman backward, new only for Identity
    assert len(names) == 2 * (2 * 3 + 2 * 2 + 2 * 4 + 3 + 2 * 3 + len(ACTIVATIONS) + 1)


def test_source_inlines_the_header_once():
    src = cupy_raw.source()
    assert "#include" not in src
    assert src.count("struct Element {") == 1


IMPORT_PROBE = """
import json, sys
sys.modules["cupy"] = None          # importing cupy now raises ImportError, as on a machine without it
from gpurnn.kernels import cupy_raw
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("cupy", "cuda", "numba") and sys.modules[m])
try:
    cupy_raw.forward("lstm", None, None, None, None, None, True)
    needs_cupy = False
except ImportError:
    needs_cupy = True
print(json.dumps({"loaded": loaded, "modules_built": cupy_raw._module.cache_info().currsize,
                  "names": len(cupy_raw.kernel_names()), "call_needs_cupy": needs_cupy}))
"""


def test_imports_without_cupy_and_compiles_nothing():
    env = {**os.environ, "GPURNN_CUDA_HOST": "0"}      # the real backend: CuPy, not the CPU harness's stand-in
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True, env=env)
    report = json.loads(out.stdout)
    assert report == {"loaded": [], "modules_built": 0, "names": len(cupy_raw.kernel_names()),
                      "call_needs_cupy": True}
