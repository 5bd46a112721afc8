"""``torchrun`` as ``tandem ... --nproc N`` starts it: the same elastic agent, without its traceback.

When a rank fails, torchrun's agent ends in an uncaught ``ChildFailedError``: a Python traceback and
a banner, printed after the rank's own output. A rank that stopped on a user's mistake (exit 2) has
already said why in one line, so here the agent exits with that status and says nothing more. Any
other failure adds one line naming the first rank to fail and how it ended; the ranks' own output
(a crash's traceback included) is passed through untouched.
"""

from __future__ import annotations

import logging
import signal
import sys

USER_ERROR = 2  # training.cli's exit status for a UserError


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from training.cli import dump_stacks_on_sigusr1

    dump_stacks_on_sigusr1()  # the agent too: `kill -USR1` shows where it waits
    # The agent's own "failed (exitcode: 2) local_rank: 0 ..." lines repeat what the line below says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if mistake := check_arguments(sys.argv[1:]):
        print(f"tandem: error: {mistake}", file=sys.stderr)
        return USER_ERROR
    try:
        torchrun(sys.argv[1:])
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode == USER_ERROR:
            return USER_ERROR
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        print(f"tandem: error: rank {rank} {how}; its output is above", file=sys.stderr)
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    except SignalException as stop:  # SIGINT or SIGTERM to the agent: the ranks were stopped with it
        return 128 + stop.sigval
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


def check_arguments(argv: list[str]) -> str | None:
    """What is wrong with torchrun's arguments (after the environment's ``PET_*`` defaults), or None:
    a port out of range is torch's traceback, and a node rank outside ``--nnodes`` waits forever at
    the rendezvous for nodes that never come."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.master_port is not None and not 0 < args.master_port <= 65535:
        return f"--master-port must be a port number in 1..65535, got {args.master_port}"
    nnodes = str(args.nnodes)
    most = int(nnodes.split(":")[-1]) if nnodes.replace(":", "").isdigit() else None
    if most is not None and not 0 <= args.node_rank < most:
        return f"--node-rank {args.node_rank} is not below --nnodes {nnodes}: nodes are numbered 0 .. nnodes - 1"
    return None


if __name__ == "__main__":
    sys.exit(main())
