"""``--nproc N``: start N local training processes through torchrun (its standalone rendezvous)."""

from __future__ import annotations

import os
import subprocess
import sys

from training import distributed


def run_local(nproc: int, argv: list[str]) -> int:
    """Run ``tandem <argv>`` in ``nproc`` processes on this machine; returns the exit status."""
    env = dict(os.environ)
    # One intra-op thread per process by default: N processes already share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    port = distributed.free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "training.cli", *argv,
    ]
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
