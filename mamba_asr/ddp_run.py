"""Multi-process (DDP) launcher for the recipes: torchrun with the commands guides show.

Usage:
    python -m mamba_asr.ddp_run --nproc_per_node=2 train_CTC.py hparams/CTC/demo.yaml \
        --data_folder data/demo
    python -m mamba_asr.ddp_run --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 \
        --master_port=29500 --nproc_per_node=8 train_S2S.py hparams/S2S/conmamba_large.yaml ...

Takes torchrun's options (``--nproc_per_node``, ``--nnodes``, ``--node_rank``,
``--master_addr``/``--master_port``, ``--rdzv_backend``/``--rdzv_endpoint``/``--rdzv_id``,
``--standalone``, ``--max_restarts``, ``--log_dir``, ...: ``python -m torch.distributed.run
--help``) and runs ``torch.distributed.run`` with them. The recipes pick the gloo backend when
torch sees no CUDA GPU, so it also runs several CPU processes. It differs from torchrun in:

* one node and no rendezvous or master address given: ``--standalone`` (a free local port, so
  two runs on one machine do not both want port 29500);
* ``--use_env`` (``torch.distributed.launch``'s; torchrun always passes the rank in the
  environment) and the script option ``--distributed_launch`` (SpeechBrain before 1.0;
  SpeechBrain 1.x detects torchrun's environment itself) are accepted and dropped;
* a failed worker ends in one line naming its rank and exit status (its own output says
  why), with that exit status; Ctrl-C ends with status 130 and no traceback (the recipe's main
  process prints where the same command resumes from).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import main as torchrun

from mamba_asr.commands import LAUNCH_ENV, python_command

# Options of torch.distributed.launch that torchrun does not take (it always behaves so).
LAUNCH_ONLY_FLAGS = ("--use_env", "--use-env")
# Script options of SpeechBrain before 1.0 that SpeechBrain 1.x no longer takes.
OBSOLETE_SCRIPT_FLAGS = ("--distributed_launch",)
# Options that place the rendezvous; without any of them one node runs --standalone.
RENDEZVOUS_FLAGS = (
    "--standalone", "--rdzv_endpoint", "--rdzv-endpoint", "--rdzv_backend", "--rdzv-backend",
    "--master_addr", "--master-addr", "--master_port", "--master-port",
)

# torchrun's loggers of the workers' shutdown (a Ctrl-C needs no more than the recipe's line).
TORCHRUN_LOGGERS = (
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.multiprocessing.api",
)


def _flag(token: str) -> str:
    """``--name`` of ``--name`` or ``--name=value``."""
    return token.split("=", 1)[0]


def torchrun_argv(argv: list[str]) -> list[str]:
    """torch.distributed.run's command line for ``argv`` (``[options] script [args]``)."""
    # Unknown options before the script (--use_env) are left over, the script's are not.
    args, _ = get_args_parser().parse_known_args(argv)
    n_script = len(args.training_script_args) + 1
    options = [a for a in argv[:-n_script] if a not in LAUNCH_ONLY_FLAGS]
    script, *script_args = argv[-n_script:]
    script_args = [a for a in script_args if _flag(a) not in OBSOLETE_SCRIPT_FLAGS]
    one_node = str(args.nnodes) in ("1", "1:1")
    if one_node and not any(_flag(a) in RENDEZVOUS_FLAGS for a in options):
        options = ["--standalone", *options]
    return [*options, script, *script_args]


def _not_interrupt_notice(record: logging.LogRecord) -> bool:
    """False for torchrun's warnings that it passes a Ctrl-C (SIGINT) on to its workers."""
    message = record.getMessage()
    sigint = "SIGINT" in message or f" {int(signal.SIGINT)} " in message
    return not (sigint and ("death signal" in message or "closing signal" in message))


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun for ``argv`` (default: this command line); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    for name in TORCHRUN_LOGGERS:
        logging.getLogger(name).addFilter(_not_interrupt_notice)
    os.environ[LAUNCH_ENV] = f"{python_command()} -m mamba_asr.ddp_run {shlex.join(argv)}"
    try:
        torchrun(torchrun_argv(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(f"ddp_run: rank {rank} ended with exit status {code} (its output above says why)",
              file=sys.stderr)
        return code
    except SignalException as exc:  # Ctrl-C or a kill: torchrun has stopped the workers
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
