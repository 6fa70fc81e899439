"""The expert-parallel MoE layer under mpiexec: EP=2, and EP=2 x DP=2 on 4 ranks, against the
one-process layer (tests/mpi_programs/moe_ep_check.py states what is compared)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
PROGRAM = Path(__file__).parent / "mpi_programs" / "moe_ep_check.py"
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(
    MPIEXEC is None, reason="mpiexec not found beside this Python: pip install -e '.[mpi]'")]


@pytest.mark.parametrize("ranks, ep_size", [(2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("k, residual", [(1, False), (2, True)])
def test_expert_parallel_layer_matches_one_process(ranks, ep_size, k, residual):
    spec = json.dumps({"k": k, "residual": residual, "ep_size": ep_size})
    result = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(PROGRAM), spec],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == ranks
