"""`gpurnn train` on one rank of an mpiexec job, for tests/test_distributed.py, with an optional fault on one rank:
    python tests/distributed_train.py '{"argv": [...], "rank": 1, "step": 5, "fault": "raise" | "sigterm"}'
The fault strikes when that rank reads the batch of that (0-based) step: "raise" a ValueError, as bad data would,
or "sigterm" the rank itself (one process of the job signalled, the others not). The hook is here, not in gpurnn."""
import json
import os
import signal
import sys

from gpurnn import cli, corpus

plan = json.loads(sys.argv[1])
if plan.get("fault"):
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == plan["rank"]:
        read = corpus.CharBatches.__call__

        def faulty(self, step, rng=None):
            if step == plan["step"] and plan["fault"] == "raise":
                raise ValueError(f"bad data in batch {step + 1}")
            if step == plan["step"] and plan["fault"] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            return read(self, step, rng)

        corpus.CharBatches.__call__ = faulty
sys.exit(cli.main(plan["argv"]))
