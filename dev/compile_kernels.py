"""Compile every CUDA C kernel file with nvcc on a machine without a GPU, to catch compile errors before
the kernels reach a GPU machine: each file as build.py gives it to NVRTC (headers pasted), plus a
function that takes the address of every registered template instantiation, so that the templates are
compiled too.

    python dev/compile_kernels.py [--arch sm_90] [file.cu ...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path

import minimoe.cuda
from minimoe.cuda import build


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    for module in pkgutil.iter_modules(minimoe.cuda.__path__):  # each family registers its instantiations
        importlib.import_module(f"minimoe.cuda.{module.name}")
    files = args.files or sorted(path.name for path in build.KERNEL_DIR.glob("*.cu"))
    failed = 0
    for name in files:
        uses = "".join(f"  (void)&{expression};\n" for expression in build._NAME_EXPRESSIONS.get(name, ()))
        source = build._source(name) + f"\nvoid instantiate_every_registered_kernel() {{\n{uses}}}\n"
        # an architecture-specific file also as Hopper's sm_90a, where its wgmma code compiles
        for arch in (args.arch, "sm_90a") if name in build._ARCHITECTURE_SPECIFIC else (args.arch,):
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / name
                path.write_text(source)
                result = subprocess.run(["nvcc", *build.compile_options(name), f"-arch={arch}", "-c", str(path),
                                         "-o", str(path.with_suffix(".o")), "-Xptxas", "-v"],
                                        capture_output=True, text=True)
            print(f"{name} ({arch}): {'ok' if result.returncode == 0 else 'FAILED'}")
            if result.returncode:
                failed += 1
                print(build._readable_log(result.stderr))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
