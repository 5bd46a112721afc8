"""``--nproc N``: start N local training processes through torchrun (its standalone rendezvous).

Imports nothing heavy: the launching process only checks inputs and starts torchrun.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from training.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True when a launcher (or Kubernetes) already set the rendezvous variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def gpu_count() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies); 0 where no NVIDIA driver is
    loaded, which is found without importing torch."""
    if not Path("/proc/driver/nvidia").exists():
        return 0
    import torch

    return torch.cuda.device_count()


def default_nproc(gpus: int, cpu_default: int) -> int:
    """Processes for a demo: ``cpu_default`` on CPU, one per GPU up to that on a GPU node."""
    return min(cpu_default, gpus) if gpus else cpu_default


def check_nproc(nproc: int, gpus: int) -> None:
    """On a GPU node each local process drives the GPU of its ``LOCAL_RANK``: no more processes than GPUs."""
    if gpus and nproc > gpus:
        raise UserError(f"--nproc {nproc} starts one process per GPU, but {gpus} GPU{'s' * (gpus > 1)} "
                        f"{'are' if gpus > 1 else 'is'} visible: use --nproc {gpus} "
                        "(or CUDA_VISIBLE_DEVICES= to run on CPU)")


def run_local(nproc: int, argv: list[str]) -> int:
    """Run ``tandem <argv>`` in ``nproc`` processes on this machine; returns the exit status."""
    check_nproc(nproc, gpu_count())
    env = dict(os.environ)
    # One intra-op thread per process by default: N processes already share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    port = free_port()
    command = [
        sys.executable, "-m", "training.torchrun",  # torchrun, minus its traceback when a rank fails
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "training.cli", *argv,
    ]
    child = subprocess.Popen(command, env=env)
    # torchrun stops its ranks on SIGTERM; a scheduler's or `timeout`'s SIGTERM reaches only this
    # process, so pass it on rather than leave the ranks training (and saving) as orphans.
    forwarded = (signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda sig, _frame: child.send_signal(sig)) for sig in forwarded}
    interrupted = False
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): wait for it
                interrupted = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        return 130
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N, not sys.exit(-N)
