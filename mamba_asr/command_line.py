"""What every command does with its user's mistakes, without importing torch: a
:class:`ConfigError` (or another error of the input) ends the command with one ``error: ...``
line and exit status 2, Ctrl-C with exit status 130.

:func:`mamba_asr.config.cli` runs the recipes through :func:`run_main`; a command that must
not import torch (``transcribe.py --backend onnxruntime``) calls it directly.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from mamba_asr.model_card import CardError


class ConfigError(ValueError):
    """The command line or the YAML asks for something that cannot run."""


def run_main(
    main: Callable[[list[str]], Any],
    user_errors: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, CardError),
    on_interrupt: Callable[[], None] | None = None,
) -> None:
    """Runs ``main(sys.argv[1:])``. One of ``user_errors`` becomes one ``error: ...`` line on
    stderr and exit status 2; Ctrl-C (KeyboardInterrupt) calls ``on_interrupt`` (to say how to
    go on) and exits with status 130. Other exceptions keep their traceback. An ``int``
    returned by ``main`` is the exit status."""
    try:
        status = main(sys.argv[1:])
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # A second Ctrl-C (or torchrun passing the signal on) must not cut the line short, nor
        # objects interrupted half-built print their finalizers' errors (a DataLoader iterator
        # interrupted while starting its workers does).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.unraisablehook = lambda unraisable: None
        if on_interrupt is not None:
            on_interrupt()
        sys.exit(130)
    if type(status) is int:  # a command's own exit status (e.g. some inputs failed)
        sys.exit(status)
