"""Compile-and-cache for the CUDA C kernel files (one place, as the design asks).

`kernel("bias_gelu.cu", "bias_forward<bf16, true, true>")` compiles bias_gelu.cu once per process with NVRTC
(CuPy also keeps the binary in its on-disk kernel cache across processes) and returns the function.
Every .cu file can `#include "common.cuh"` (the bf16 type, conversions, reductions) and the other
headers of this folder (philox.cuh: the Philox generator). A header is pasted into the source here
rather than included by NVRTC: CuPy's disk cache is keyed on the source text, so an edit of a header
must change that text, or a stale binary would be loaded. `#line`
directives keep compiler messages pointing at the right file and line, and a compile error is raised
as a KernelBuildError that names them, not NVRTC's temporary file. Constants that a kernel and its
Python launcher share are registered with the file (register's `constants`) and reach the compiler as
-D defines; CuPy's cache key holds the options too.

A file registered as architecture-specific is compiled, on a Hopper GPU (compute capability 9.0), for
sm_90a rather than sm_90: the target whose instructions (wgmma, the warpgroup's tensor-core product) run
only on that architecture, and which the file uses where `__CUDA_ARCH_FEAT_SM90_ALL` is defined. CuPy
always names the device's plain target itself, so such a file goes to NVRTC directly, and its binary is
kept in CuPy's cache folder by `cached_binary` (keyed as CuPy keys its own: source, options, NVRTC's
version), so that every process after the first loads it rather than compiling it for seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

KERNEL_DIR = Path(__file__).resolve().parent
# Template instantiations each file provides, so that one compile makes all of them available.
_NAME_EXPRESSIONS: dict[str, tuple[str, ...]] = {}
_CONSTANTS: dict[str, dict[str, int]] = {}  # compile-time constants of each file, see register()
_ARCHITECTURE_SPECIFIC: set[str] = set()  # files compiled for sm_90a on Hopper, see register()


class KernelBuildError(RuntimeError):
    """A .cu file failed to compile; the message names the file and line."""


KERNEL_TYPES = {"float32": "float", "bfloat16": "bf16"}  # array dtype name -> common.cuh's element type


def type_name(array: Any) -> str:
    """The kernels' template element type for an array: "float" or "bf16" (KeyError for other dtypes)."""
    return KERNEL_TYPES[array.dtype.name]


def optional_array(array: Any, dtype: Any) -> Any:
    """A kernel's optional array argument: the array, contiguous in `dtype` (no copy when it already is), or
    a null pointer when it is None (the kernel's "not given")."""
    import cupy
    import numpy as np

    return np.uint64(0) if array is None else cupy.ascontiguousarray(array, dtype=dtype)


def kernel_arrays(*arrays: Any) -> bool:
    """The kernels' common case: every array on the GPU, C-contiguous (a kernel indexes its rows directly),
    and all of one dtype that the kernels are built for (KERNEL_TYPES)."""
    from minimoe.backend import is_gpu

    return (all(is_gpu(a) and a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays)
            and arrays[0].dtype.name in KERNEL_TYPES)


def row_vectors(array: Any) -> str:
    """common.cuh's Row<T, VEC> flag for rows along the last axis: "true" when a row is a whole number of
    16-byte vectors (rows of a contiguous allocation then start 16-byte aligned)."""
    return "true" if (array.shape[-1] * array.dtype.itemsize) % 16 == 0 else "false"


def per_load(array: Any) -> int:
    """Elements of the array's rows that one Row<T, VEC> load reads: a 16-byte vector where row_vectors
    says so, else one."""
    return 16 // array.dtype.itemsize if row_vectors(array) == "true" else 1


def register(filename: str, *name_expressions: str, constants: dict[str, int] | None = None,
             architecture_specific: bool = False) -> None:
    """Declare the (templated) kernel names a .cu file must export, and the compile-time constants its
    Python side also uses (tile sizes, threads per block): defined once, in the .py file, and given to the
    compiler as -D defines, so that the two sides cannot disagree. `architecture_specific`: on Hopper,
    compile for sm_90a (see the module's docstring)."""
    _NAME_EXPRESSIONS[filename] = tuple(name_expressions)
    _CONSTANTS[filename] = dict(constants or {})
    if architecture_specific:
        _ARCHITECTURE_SPECIFIC.add(filename)


def compile_options(filename: str) -> tuple[str, ...]:
    """NVRTC's (and nvcc's) options for a .cu file: C++17 and its registered constants."""
    return ("-std=c++17", *(f"-D{name}={value}" for name, value in _CONSTANTS.get(filename, {}).items()))


INCLUDE = re.compile(r'^#include "(\w+\.cuh)"$', flags=re.MULTILINE)  # a header of this folder


def _source(filename: str, pasted: set[str] | None = None) -> str:
    """The .cu (or .cuh) file with each `#include "<name>.cuh"` of this folder pasted in its place (each
    header once per source), framed by #line directives so that messages name the right file and line."""
    pasted = set() if pasted is None else pasted
    text = (KERNEL_DIR / filename).read_text()
    out, position = [f'#line 1 "{filename}"\n'], 0
    for match in INCLUDE.finditer(text):
        out.append(text[position:match.start()])
        header = match.group(1)
        if header not in pasted:
            pasted.add(header)
            out.append(_source(header, pasted) + "\n")
        out.append(f'#line {text.count(chr(10), 0, match.end()) + 2} "{filename}"\n')  # the line after it
        position = match.end() + 1
    out.append(text[position:])
    return "".join(out)


def _readable_log(log: str) -> str:
    """NVRTC reports 'layernorm.cu(12): error: ...'; say '<path>/cuda/layernorm.cu:12: error: ...'."""
    return re.sub(r"([\w.]+\.cuh?)\((\d+)\)", lambda m: f"{KERNEL_DIR / m.group(1)}:{m.group(2)}", log)


def cache_dir() -> Path:
    """CuPy's kernel cache folder (CUPY_CACHE_DIR, else ~/.cupy/kernel_cache), which also holds the binaries
    of the files compiled here for sm_90a."""
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def cached_binary(key: str, compile_binary: Any) -> tuple[bytes, dict[str, str]]:
    """The binary and lowered kernel names that `compile_binary()` returns for a compile identified by `key`,
    read from the cache folder when an earlier process stored them. A file holds the names as one JSON line,
    then the binary; it is written under a temporary name and renamed, so that a process that is stopped
    mid-write, or two that write at once, never leave a partial file behind for a later one to load (one
    that cannot be read anyway is compiled again and replaced)."""
    path = cache_dir() / f"minimoe_{hashlib.sha256(key.encode()).hexdigest()}.cubin"
    try:
        names, binary = path.read_bytes().split(b"\n", 1)
        return binary, json.loads(names)
    except (OSError, ValueError):  # not stored yet (or unreadable)
        pass
    binary, lowered = compile_binary()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(json.dumps(lowered).encode() + b"\n" + binary)
    os.replace(partial, path)
    return binary, lowered


class _HopperModule:
    """A .cu file compiled by NVRTC for sm_90a: the module and its kernels' lowered (mangled) names."""

    def __init__(self, filename: str) -> None:
        import cupy
        from cupy_backends.cuda.libs import nvrtc

        names = _NAME_EXPRESSIONS.get(filename, ())
        source = _source(filename)
        options = [*compile_options(filename), "-ftz=true", "-arch=sm_90a"]  # -ftz=true as CuPy compiles

        def compile_binary() -> tuple[bytes, dict[str, str]]:
            program = nvrtc.createProgram(source, filename, (), ())
            try:
                for name in names:
                    nvrtc.addNameExpression(program, name)
                try:
                    nvrtc.compileProgram(program, options)
                except nvrtc.NVRTCError:
                    raise KernelBuildError(_readable_log(nvrtc.getProgramLog(program))) from None
                return nvrtc.getCUBIN(program), {name: nvrtc.getLoweredName(program, name) for name in names}
            finally:
                nvrtc.destroyProgram(program)

        cubin, self.lowered = cached_binary(repr((source, options, names, nvrtc.getVersion())), compile_binary)
        self.module = cupy.cuda.function.Module()
        self.module.load(cubin)

    def get_function(self, name: str) -> Any:
        return self.module.get_function(self.lowered[name])


@functools.cache
def load_module(filename: str) -> Any:
    import cupy

    if filename in _ARCHITECTURE_SPECIFIC and cupy.cuda.Device().compute_capability == "90":
        return _HopperModule(filename)
    module = cupy.RawModule(code=_source(filename), options=compile_options(filename),
                            name_expressions=_NAME_EXPRESSIONS.get(filename, ()))
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as error:
        raise KernelBuildError(_readable_log(str(error))) from None
    return module


@functools.cache
def kernel(filename: str, name: str) -> Any:
    """The compiled kernel `name` of `filename`. Cached: CuPy's get_function builds a new RawKernel, and
    looks the module up again, on every call, tens of microseconds of host time per launch."""
    return load_module(filename).get_function(name)
