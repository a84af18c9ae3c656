"""CUDA C kernels on the CPU: the cupy backend's source compiled for the host and launched as CUDA launches them.

``GPURNN_CUDA_HOST=1`` (read once) switches it on, as ``NUMBA_ENABLE_CUDASIM=1`` switches on Numba's simulator:
``backend="cupy"`` then runs on NumPy arrays (device "cpu") through ``cupy_host``, a NumPy stand-in for the CuPy
calls the backend makes, whose ``RawModule`` is the one below. A module's code, unchanged, is compiled by a C++17
compiler (``$CXX``, default g++) after ``host_include/cuda_host.h``, which defines the CUDA surface and runs every
CUDA thread as a fiber (what it supports: see that header), plus one generated ``extern "C"`` launcher per name
expression taking grid, block, dynamic shared bytes and a ``void**`` argument array, as ``cuLaunchKernel`` does,
and linked with the scheduler (``host_include/cuda_host_runtime.cpp``, compiled once). Both are cached under
``$XDG_CACHE_HOME/gpurnn/cuda_host`` (else ``~/.cache``, else a temporary folder), keyed by a hash of the source,
the headers, the flags and the compiler's version, and a module is built and loaded at most once per process. Kernel arguments are checked against each parameter's C++ type: an array of
another dtype, a non-contiguous or read-only array where the kernel writes, or a Python number where the kernel
takes an ``int`` is a TypeError, never a silent reinterpretation.
"""
import collections
import ctypes
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ENV = "GPURNN_CUDA_HOST"
INCLUDE = Path(__file__).parent / "host_include"
# -ffp-contract=off: a * b + c stays two roundings, as __fmul_rn/__fadd_rn and the IEEE operations keep them on the GPU
FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-fvisibility=hidden", "-fno-extern-tls-init", "-pthread")
RUNTIME = INCLUDE / "cuda_host_runtime.cpp"   # the scheduler: compiled once, linked into every module
MAX_BLOCK = (1024, 1024, 64)                  # threads per block along x, y, z; 1024 in all
MAX_GRID = (2 ** 31 - 1, 65535, 65535)
MAX_COOPERATIVE_BLOCKS = 1024                 # a cooperative launch runs one OS thread per block
DEFAULT_SHARED = 48 * 1024                    # dynamic shared memory without the opt-in attribute
MAX_SHARED = 227 * 1024                       # the most a kernel may opt in to (sm_90)
SCALARS = {"f4": np.float32, "f8": np.float64, "i1": np.int8, "i2": np.int16, "i4": np.int32, "i8": np.int64,
           "u1": np.uint8, "u2": np.uint16, "u4": np.uint32, "u8": np.uint64, "b1": np.bool_}
SLOTS = {"f4": "f4x", "f8": "d", "i1": "b7x", "i2": "h6x", "i4": "i4x", "i8": "q", "u1": "B7x", "u2": "H6x",
         "u4": "I4x", "u8": "Q", "b1": "?7x"}    # every argument in an 8-byte slot, value first
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?P<decl>[^;\[]+?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;")
ALIGN = re.compile(r"__align__\s*\(\s*\d+\s*\)")

launched = collections.Counter()              # name expression -> launches in this process


@functools.lru_cache(maxsize=None)
def enabled():
    """True when GPURNN_CUDA_HOST=1: the cupy backend runs its CUDA C on the CPU. Read once per process."""
    return os.environ.get(ENV, "0") == "1"


class CompileError(RuntimeError):
    pass


def translation_unit(code, names):
    """The C++ the host compiles: the shim; the code's extern __shared__ arrays, defined before it (so each is a
    known thread_local of the shim's maximum size, of a built-in or shim type); the code as given; one launcher
    and one signature function per name expression (gpurnn_launch_<i>, gpurnn_signature_<i>)."""
    dynamic = {m["name"]: m["decl"] for m in DYNAMIC_SHARED.finditer(code)}
    out = ['#include "cuda_host.h"']
    out += [f"__shared__ {decl} {name}[gpurnn_host::kDynamicSharedMax / sizeof({ALIGN.sub('', decl)})];"
            for name, decl in dynamic.items()]
    entries = ", ".join(f"{{+[]() -> void* {{ return (void*){name}; }}}}" for name in dynamic) or "{nullptr}"
    out += ["namespace gpurnn_host {", f"const DynamicShared dynamic_shared[] = {{{entries}}};",
            f"const unsigned dynamic_shared_count = {len(dynamic)};", "}",
            '#line 1 "kernels.cu"', code, '#line 1 "cuda_host_launchers.cpp"']
    for i, name in enumerate(names):
        out += [f"GPURNN_EXPORT int gpurnn_launch_{i}(const unsigned* grid, const unsigned* block, size_t shared, "
                f"int cooperative, void** args) {{ return gpurnn_host::launch(&{name}, grid, block, shared, "
                f"cooperative, args); }}",
                f"GPURNN_EXPORT const char* const* gpurnn_signature_{i}() {{ return gpurnn_host::signature(&{name}); }}"]
    return "\n".join(out) + "\n"


@functools.lru_cache(maxsize=None)
def compiler():
    """(the C++ compiler's command, its identity: version and target)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise CompileError(f"{ENV}=1 compiles the CUDA C kernels for the CPU with a C++17 compiler; {cxx!r} is not "
                           "on PATH (install g++ or set CXX)")
    identity = [subprocess.run([cxx, flag], capture_output=True, text=True).stdout.strip()
                for flag in ("--version", "-dumpmachine")]
    return cxx, "\n".join(identity)


def cache_dir():
    """Where built modules live: $XDG_CACHE_HOME/gpurnn/cuda_host, ~/.cache/..., else a temporary folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    uid = getattr(os, "getuid", lambda: 0)()
    for folder in (base / "gpurnn" / "cuda_host", Path(tempfile.gettempdir()) / f"gpurnn-cuda-host-{uid}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise CompileError("no writable cache folder for the CUDA host build (set XDG_CACHE_HOME)")


def build(name, text, args):
    """`name` in the cache folder, compiled from the C++ `text` with `args` unless it is there already."""
    cxx, _ = compiler()
    folder = cache_dir()
    target = folder / name
    if target.exists():
        return target
    source, built = (folder / f"{name}.{os.getpid()}.{suffix}" for suffix in ("cpp", "tmp"))
    source.write_text(text)
    try:
        run = subprocess.run([cxx, *FLAGS, *args, "-I", str(INCLUDE), "-o", str(built), str(source)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise CompileError(f"the host build of CUDA C failed ({cxx}):\n{run.stderr[-8000:]}")
        os.replace(built, target)       # atomic: a concurrent process sees the whole file or none
    finally:
        source.unlink(missing_ok=True)
        built.unlink(missing_ok=True)
    return target


def key(*parts):
    """A cache key: the hash of the parts, the shim headers, the flags and the compiler's identity."""
    headers = [p.read_text() for p in sorted(INCLUDE.glob("*.h"))]
    return hashlib.sha256("\0".join([*parts, *headers, *FLAGS, compiler()[1]]).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def runtime_object():
    """The scheduler's object file, linked into every module."""
    text = RUNTIME.read_text()
    return build(f"runtime-{key(text)}.o", text, ["-c"])


@functools.lru_cache(maxsize=None)
def library(unit, defines=()):
    """The loaded shared object of a translation unit: from the cache, or compiled into it first."""
    runtime = runtime_object()
    target = build(f"{key(unit, runtime.name, *defines)}.so", unit, ["-shared", *defines, str(runtime)])
    lib = ctypes.CDLL(str(target))
    lib.gpurnn_host_error.restype = ctypes.c_char_p
    return lib


class RawModule:
    """cupy.RawModule on the host: the same code, options and name expressions. Of the NVRTC options only
    -D/--define-macro apply here; the code is compiled (or taken from the cache) on the first get_function."""

    def __init__(self, code, options=(), name_expressions=None):
        if not name_expressions:
            raise ValueError("the CUDA host harness launches kernels by name expression: pass name_expressions")
        self.code = code
        self.name_expressions = list(name_expressions)
        self.defines = tuple(f"-D{o.split('=', 1)[1] if o.startswith('--define-macro=') else o[2:]}"
                             for o in options if o.startswith(("-D", "--define-macro=")))

    def get_function(self, name):
        if name not in self.name_expressions:
            raise ValueError(f"{name!r} is not one of the module's name expressions")
        lib = library(translation_unit(self.code, self.name_expressions), self.defines)
        i = self.name_expressions.index(name)
        signature = getattr(lib, f"gpurnn_signature_{i}")
        signature.restype = ctypes.POINTER(ctypes.c_char_p)
        launcher = getattr(lib, f"gpurnn_launch_{i}")
        launcher.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                             ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        launcher.restype = ctypes.c_int
        params, codes = [], signature()       # the parameters' type codes, null-terminated
        while codes[len(params)] is not None:
            params.append(codes[len(params)].decode())
        return HostKernel(name, launcher, params, lib)


def _dims(value, what, limits):
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if any(not 1 <= d <= m for d, m in zip(dims, limits)):
        raise ValueError(f"{what} {value!r} is out of range: each dimension 1..{limits}")
    return dims


class HostKernel:
    """One name expression of a host-built module, called as a cupy RawKernel: kernel(grid, block, args, ...)."""

    def __init__(self, name, launcher, params, lib):
        self.name = name
        self.params = params                   # type codes, e.g. ["c*f4", "*f4", "i4"]
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED
        self._launcher = launcher
        self._lib = lib
        known = all(c.lstrip("c*") in SLOTS for c in params)
        self._format = "=" + "".join("Q" if "*" in c else SLOTS[c] for c in params) if known else None

    def _values(self, args):
        if not isinstance(args, tuple):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = []
        for i, (code, a) in enumerate(zip(self.params, args)):
            what = f"{self.name} argument {i}"
            if code.lstrip("c*") not in SLOTS:
                raise TypeError(f"{what}: its C++ type is not one the host harness can check")
            if "*" in code:
                dtype = np.dtype(SCALARS[code.lstrip("c*")])
                if not isinstance(a, np.ndarray) or a.dtype != dtype:
                    got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                    raise TypeError(f"{what}: expected a {dtype} array, got {got}")
                if not a.flags.c_contiguous:
                    raise TypeError(f"{what}: the array must be C-contiguous (a kernel sees only its pointer)")
                if not code.startswith("c") and not a.flags.writeable:
                    raise TypeError(f"{what}: the kernel writes through it but the array is read-only")
                values.append(a.__array_interface__["data"][0])
            else:
                if type(a) is not SCALARS[code]:
                    raise TypeError(f"{what}: expected np.{SCALARS[code].__name__}, got {type(a).__name__}")
                values.append(a)
        return values

    def __call__(self, grid, block, args, *, shared_mem=0, enable_cooperative_groups=False):
        grid3, block3 = _dims(grid, "grid", MAX_GRID), _dims(block, "block", MAX_BLOCK)
        if block3[0] * block3[1] * block3[2] > MAX_BLOCK[0]:
            raise ValueError(f"block {block!r} has more than {MAX_BLOCK[0]} threads")
        if not isinstance(shared_mem, (int, np.integer)) or not 0 <= shared_mem <= self.max_dynamic_shared_size_bytes:
            raise ValueError(f"shared_mem must be 0..{self.max_dynamic_shared_size_bytes} bytes (more needs "
                             f"max_dynamic_shared_size_bytes, up to {MAX_SHARED}), got {shared_mem!r}")
        if enable_cooperative_groups and grid3[0] * grid3[1] * grid3[2] > MAX_COOPERATIVE_BLOCKS:
            raise ValueError(f"a cooperative launch of more than {MAX_COOPERATIVE_BLOCKS} blocks cannot be resident")
        values = self._values(args)
        n = max(len(values), 1)
        slots = (ctypes.c_uint64 * n).from_buffer_copy(struct.pack(self._format, *values).ljust(8 * n, b"\0"))
        base = ctypes.addressof(slots)
        pointers = (ctypes.c_void_p * n)(*range(base, base + 8 * n, 8))
        launched[self.name] += 1
        if self._launcher((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), int(shared_mem),
                          int(bool(enable_cooperative_groups)), pointers):
            raise RuntimeError(f"{self.name}: {self._lib.gpurnn_host_error().decode()}")

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._max_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        if not 0 <= int(value) <= MAX_SHARED:
            raise ValueError(f"max_dynamic_shared_size_bytes must be 0..{MAX_SHARED}, got {value!r}")
        self._max_shared = int(value)
