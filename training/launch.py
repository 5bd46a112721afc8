"""``--nproc N``: start N local training processes through torchrun (its standalone rendezvous).

Imports nothing heavy: the launching process only checks inputs and starts torchrun.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True when a launcher (or Kubernetes) already set the rendezvous variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_local(nproc: int, argv: list[str]) -> int:
    """Run ``tandem <argv>`` in ``nproc`` processes on this machine; returns the exit status."""
    env = dict(os.environ)
    # One intra-op thread per process by default: N processes already share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    port = free_port()
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
