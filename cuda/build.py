"""Compile-and-cache for the CUDA C kernel files (one place, as the design asks).

`kernel("bias_gelu.cu", "bias_gelu_forward<bf16>")` compiles bias_gelu.cu once per process with NVRTC
(CuPy also keeps the binary in its on-disk kernel cache across processes) and returns the function.
Every .cu file can `#include "common.cuh"` (the bf16 type and conversions). A compile error is raised
as a KernelBuildError that names the .cu file and line, not NVRTC's temporary file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

KERNEL_DIR = Path(__file__).resolve().parent
# Template instantiations each file provides, so that one compile makes all of them available.
_NAME_EXPRESSIONS: dict[str, tuple[str, ...]] = {}


class KernelBuildError(RuntimeError):
    """A .cu file failed to compile; the message names the file and line."""


def register(filename: str, *name_expressions: str) -> None:
    """Declare the (templated) kernel names a .cu file must export."""
    _NAME_EXPRESSIONS[filename] = tuple(name_expressions)


def _readable_log(log: str, filename: str) -> str:
    """NVRTC reports '/tmp/tmpXXXX/<hash>.cubin.cu(12): error: ...'; say 'cuda/<file>:12: error: ...'."""
    return re.sub(r"\S*?\.cu\((\d+)\)", lambda m: f"{KERNEL_DIR / filename}:{m.group(1)}", log)


@functools.cache
def load_module(filename: str) -> Any:
    import cupy

    source = (KERNEL_DIR / filename).read_text()
    module = cupy.RawModule(code=source, options=("-std=c++17", f"-I{KERNEL_DIR}"),
                            name_expressions=_NAME_EXPRESSIONS.get(filename, ()))
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as error:
        raise KernelBuildError(_readable_log(str(error), filename)) from None
    return module


def kernel(filename: str, name: str) -> Any:
    return load_module(filename).get_function(name)
