"""Run under mpiexec by tests/test_moe_ep.py: `minimoe train` where rank 1 fails before the first
collective (its training raises at once) while rank 0 starts training, which would wait for rank 1
forever unless the failure aborts the whole job. argv[1:]: the `minimoe train` arguments."""

import sys

import minimoe.train
from minimoe.cli import main
from minimoe.parallel import world_communicator

if world_communicator().rank == 1:
    def failing_train(*args, **kwargs):
        raise RuntimeError("a bug that only rank 1 meets")

    minimoe.train.train = failing_train
sys.exit(main(sys.argv[1:]))
