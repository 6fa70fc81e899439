"""cuda/build.py without a GPU: the header is pasted with #line directives, errors name file and line."""

from minimoe.cuda import build


def test_source_pastes_the_header_with_line_directives():
    source = build._source("layernorm.cu")
    assert '#include "common.cuh"' not in source
    assert (build.KERNEL_DIR / "common.cuh").read_text() in source
    lines = (build.KERNEL_DIR / "layernorm.cu").read_text().splitlines()
    include_line = lines.index('#include "common.cuh"') + 1
    # Numbering resumes at the include's own line (its remainder is empty), so every later line keeps
    # its number.
    assert f'#line {include_line} "layernorm.cu"\n\n' in source


def test_compiler_messages_name_the_kernel_file_and_line():
    log = 'layernorm.cu(12): error: expected a ";"\ncommon.cuh(3): note: here'
    readable = build._readable_log(log)
    assert f"{build.KERNEL_DIR / 'layernorm.cu'}:12: error" in readable
    assert f"{build.KERNEL_DIR / 'common.cuh'}:3: note" in readable
