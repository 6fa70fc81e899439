"""Run under mpiexec by tests/test_moe_ep.py: `minimoe train` where only rank 1 gets a Ctrl-C (SIGINT),
during step 3. Every rank must stop after that same step, save one checkpoint together and exit
cleanly; a rank that went on alone would wait forever in its next collective. argv[1:]: the
`minimoe train` arguments."""

import os
import signal
import sys

import minimoe.train
from minimoe.cli import main
from minimoe.parallel import world_communicator

if world_communicator().rank == 1:
    schedule = minimoe.train.cosine_lr

    def interrupted_schedule(step, *args):
        if step == 2:  # the loop asks for step 3's learning rate (steps count from 0 here)
            os.kill(os.getpid(), signal.SIGINT)
        return schedule(step, *args)

    minimoe.train.cosine_lr = interrupted_schedule
sys.exit(main(sys.argv[1:]))
