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


class _Interrupt:
    """Whether Ctrl-C came while :func:`run_main` ran (set by :func:`_on_sigint`)."""

    seen = False


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C: remembered, then KeyboardInterrupt as Python's default handler raises it."""
    _Interrupt.seen = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """KeyboardInterrupt again when Ctrl-C came but its KeyboardInterrupt was lost: raised
    while a finaliser ran (a DataLoader iterator's ``__del__`` joins its workers at every
    stage change), Python reports it as ignored and the run would go on. The training loop
    calls this at batch and stage boundaries."""
    if _Interrupt.seen:
        raise KeyboardInterrupt


def run_main(
    main: Callable[[list[str]], Any],
    user_errors: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, CardError),
    on_interrupt: Callable[[], None] | None = None,
) -> None:
    """Runs ``main(sys.argv[1:])``. One of ``user_errors`` becomes one ``error: ...`` line on
    stderr and exit status 2; Ctrl-C (KeyboardInterrupt) calls ``on_interrupt`` (to say how to
    go on) and exits with status 130 (a Ctrl-C whose KeyboardInterrupt a finaliser swallowed
    is raised again at the training loop's next boundary: :func:`raise_if_interrupted`).
    Other exceptions keep their traceback. An ``int`` returned by ``main`` is the exit
    status."""
    _Interrupt.seen = False
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.unraisablehook

    def unraisable_hook(unraisable: Any) -> None:  # the lost Ctrl-C is raised again: no report
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = unraisable_hook
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
    finally:
        if signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, previous)
        if sys.unraisablehook is unraisable_hook:
            sys.unraisablehook = previous_hook
    if type(status) is int:  # a command's own exit status (e.g. some inputs failed)
        sys.exit(status)
