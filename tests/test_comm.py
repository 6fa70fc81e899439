"""Communicators without MPI (LocalComm, layout checks), and with it: flat and hierarchical all-to-all,
the collectives and the EP x DP groups against a NumPy model, under `mpiexec -n 2` and `-n 4`
(marker `mpi`; skipped, with the reason, where the mpi extra is not installed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import MPIEXEC
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minimoe.comm.alltoall import HierarchicalComm
from minimoe.comm.communicator import LocalComm
from minimoe.comm.groups import LayoutError, check_layout

PROGRAM = Path(__file__).parent / "mpi_programs" / "comm_check.py"


def test_local_comm_is_the_identity():
    comm = LocalComm()
    rows = np.arange(12.0).reshape(4, 3)
    for received, counts in (comm.all_to_all_v(rows, [4]), HierarchicalComm(comm, 1).all_to_all_v(rows, [4])):
        np.testing.assert_array_equal(received, rows)
        assert counts == [4]
    assert comm.all_reduce(np.ones(2), "max").tolist() == [1, 1]
    with pytest.raises(ValueError, match="counts adding up to the 4 rows"):
        comm.all_to_all_v(rows, [3])
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(rows, "mean")


def test_layouts_that_do_not_divide_are_refused():
    assert check_layout(8, 4, [8, 16]) == 2
    with pytest.raises(LayoutError, match="world size 6 is not ep_size=4 x dp_size"):
        check_layout(6, 4, [8])
    with pytest.raises(LayoutError, match="6 experts, which ep_size=4 does not divide"):
        check_layout(8, 4, [8, 6])
    with pytest.raises(LayoutError, match="local_size=3 ranks per node does not divide ep_size=4"):
        check_layout(8, 4, [8], local_size=3)
    assert check_layout(8, 4, [8], local_size=2) == check_layout(8, 4, [8], local_size=8) == 2


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found: pip install -e '.[mpi]'")
# No shrinking: each example is an mpiexec launch, and shrinking a failure would take minutes.
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(ranks=st.sampled_from([2, 4]), data=st.data())
def test_all_to_all_and_groups_match_the_model_under_mpiexec(ranks, data):
    local_size = data.draw(st.sampled_from([d for d in (1, 2, ranks) if ranks % d == 0]))
    ep_size = data.draw(st.sampled_from([d for d in (1, 2, ranks) if ranks % d == 0]))
    counts = data.draw(arrays(np.int64, (ranks, ranks), elements=st.integers(0, 3)))  # zeros included
    run_check(ranks, counts, local_size, ep_size)


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found: pip install -e '.[mpi]'")
def test_hierarchical_all_to_all_on_two_simulated_nodes_of_two():
    """The layout the design names: 4 ranks as 2 nodes x 2 local ranks, EP=2 x DP=2."""
    counts = np.random.default_rng(0).integers(0, 4, (4, 4))
    counts[1, 2] = 0
    run_check(4, counts, local_size=2, ep_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found: pip install -e '.[mpi]'")
def test_nccl_all_to_all_and_collectives_on_every_gpu():
    """NCCLComm on CuPy arrays, one rank per GPU of this machine (one GPU: NCCL with one rank), against
    the same model; bf16 all_reduce too (gradients travel in bf16)."""
    gpus = gpu_count()
    counts = np.random.default_rng(1).integers(0, 5, (gpus, gpus))
    counts[0, -1] = 0
    run_check(gpus, counts, local_size=max(1, gpus // 2), ep_size=gpus, nccl=True)


def gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no CuPy, no driver: either way no GPU to test on
        pytest.skip(f"no usable GPU ({type(error).__name__}: {error})")


def run_check(ranks: int, counts: np.ndarray, local_size: int, ep_size: int, nccl: bool = False) -> None:
    spec = json.dumps({"counts": counts.tolist(), "local_size": local_size, "ep_size": ep_size, "nccl": nccl})
    result = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(PROGRAM), spec],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == ranks
