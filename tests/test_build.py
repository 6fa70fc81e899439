"""cuda/build.py without a GPU: headers are pasted with #line directives, errors name file and line."""

import re

import pytest

from minimoe.cuda import build


def lines_as_the_compiler_numbers_them(source):
    """[(file, line number, text)] for every line of a pasted source, following its #line directives."""
    numbered, file, line = [], None, 0
    for text in source.split("\n"):
        directive = re.fullmatch(r'#line (\d+) "([\w.]+)"', text)
        if directive:
            line, file = int(directive.group(1)), directive.group(2)
            continue
        numbered.append((file, line, text))
        line += 1
    return numbered


@pytest.mark.parametrize("filename", sorted(path.name for path in build.KERNEL_DIR.glob("*.cu")))
def test_every_pasted_line_keeps_its_file_and_number(filename):
    """Each line the compiler sees is the line its #line directive says it is, for every kernel file
    and the headers pasted into it (common.cuh, philox.cuh), and no include of a local header is left."""
    source = build._source(filename)
    assert not build.INCLUDE.search(source)
    files = {}
    for file, line, text in lines_as_the_compiler_numbers_them(source):
        lines = files.setdefault(file, (build.KERNEL_DIR / file).read_text().split("\n"))
        assert lines[line - 1] == text, (file, line)
    assert "common.cuh" in files or "common.cuh" not in (build.KERNEL_DIR / filename).read_text()


def test_compiler_messages_name_the_kernel_file_and_line():
    log = 'layernorm.cu(12): error: expected a ";"\ncommon.cuh(3): note: here'
    readable = build._readable_log(log)
    assert f"{build.KERNEL_DIR / 'layernorm.cu'}:12: error" in readable
    assert f"{build.KERNEL_DIR / 'common.cuh'}:3: note" in readable


@pytest.mark.parametrize("filename", sorted(path.name for path in build.KERNEL_DIR.glob("*.cu")))
def test_every_constant_a_kernel_file_expects_is_registered_by_its_python_side(filename):
    """A .cu file names the -D constants it needs in an `#if !defined(...)` guard; its family module
    registers each of them with build.register, so NVRTC and nvcc get them all (and nothing undeclared)."""
    import importlib

    importlib.import_module(f"minimoe.cuda.{filename.removesuffix('.cu')}")
    expected = set(re.findall(r"!defined\((\w+)\)", (build.KERNEL_DIR / filename).read_text()))
    given = {option.removeprefix("-D").split("=")[0] for option in build.compile_options(filename)
             if option.startswith("-D")}
    assert given == expected



def test_cached_binary_builds_once_per_key_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """The sm_90a binaries' disk cache: a later call with the same key (a later process) gets the stored
    binary and names back byte for byte without building; another key builds again."""
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    builds = []

    def compile_it():
        builds.append(1)
        binary = bytes(range(256)) * 3 + b"\n\x00" + bytes([len(builds)])  # newlines and zero bytes, as a cubin
        return binary, {"flash<64>": f"_Z5flashILi64EEvv{len(builds)}"}

    first = build.cached_binary("source A, options", compile_it)
    again = build.cached_binary("source A, options", compile_it)
    other = build.cached_binary("source B, options", compile_it)
    assert len(builds) == 2
    assert again == first and again[0].endswith(b"\n\x00\x01")
    assert other[0].endswith(b"\x02") and other[1] == {"flash<64>": "_Z5flashILi64EEvv2"}
    assert sorted(path.suffix for path in (tmp_path / "cache").iterdir()) == [".cubin", ".cubin"]
    for path in (tmp_path / "cache").iterdir():
        path.write_bytes(b"not the names")  # a file that cannot be read is compiled again and replaced
    assert build.cached_binary("source A, options", compile_it) == (first[0][:-1] + b"\x03",
                                                                     {"flash<64>": "_Z5flashILi64EEvv3"})
    assert len(builds) == 3 and build.cached_binary("source A, options", compile_it)[1]["flash<64>"].endswith("3")
