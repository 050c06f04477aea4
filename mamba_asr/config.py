"""The command line and configuration of a recipe run (``train_CTC.py``, ``train_S2S.py``,
``train_LM.py``, ``evaluate.py``).

* :func:`load_config`: command line -> (hparams, run options), every problem a
  :class:`ConfigError` naming the file/key/value: an option given twice, unknown override,
  unset placeholder, a key the recipe needs missing from the YAML, ``--resume_from`` without
  a checkpoint, unwritable ``output_folder``, CUDA or fp16 asked for without CUDA.
  ``--resume PATTERN...`` picks the newest complete checkpoint matched as ``resume_from``.
* :func:`start_run`: the start every recipe shares (config, threads, DDP group, experiment
  folder, manifests). Both check before they create: an error before the run starts leaves
  no output folder behind that was not there before.
* :func:`cli`: a recipe's ``__main__``: those errors (and a checkpoint save out of disk
  space) become one ``error:`` line and exit status 2; Ctrl-C one ``interrupted:`` line
  naming the checkpoint the same command resumes from, and exit status 130.
* :func:`resolve_run_opts`: device-dependent run options, checked before anything runs
  (gloo for ``torchrun`` without CUDA, a clear error for fp16 without CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import speechbrain as sb
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from speechbrain.utils.distributed import get_rank, infer_device
from speechbrain.utils.run_opts import RunOptions

from mamba_asr.checkpoints import CheckpointSpaceError
from mamba_asr.command_line import ConfigError, run_main
from mamba_asr.commands import rerun_command
from mamba_asr.data import check_data_folder, prepare_manifests
from mamba_asr.librispeech import LibriSpeechPrepError
from mamba_asr.model_card import CardError
from mamba_asr.resume import checkpoint_from_dir, newest_checkpoint, pending_resume
from mamba_asr.training_monitor import TrainingDiverged

logger = logging.getLogger(__name__)


class PrecisionError(ConfigError):
    """The requested precision cannot run on this device."""


def _load_yaml(hparams_file: str, overrides: str) -> dict[str, Any]:
    """HyperPyYAML loading with the errors of a user's mistakes made into ConfigErrors."""
    try:
        with open(hparams_file, encoding="utf-8") as f:
            return load_hyperpyyaml(f, overrides)
    except OSError as exc:  # the file, or a folder an object creates on loading (checkpointer)
        if exc.filename is None:
            raise
        if Path(exc.filename) == Path(hparams_file):
            raise ConfigError(f"configuration file {hparams_file} does not exist") from exc
        raise ConfigError(
            f"loading {hparams_file} needs {exc.filename}, which cannot be created "
            f"({exc.strerror}): choose a writable --output_folder"
        ) from exc
    except KeyError as exc:  # hyperpyyaml: "Override 'x' not found in: [...]"
        message = str(exc.args[0]) if exc.args else ""
        if not message.startswith("Override '"):
            raise
        key = message.split("'")[1]
        raise ConfigError(
            f"--{key}: {hparams_file} has no key {key!r} (a command-line override can only "
            "change a key the YAML defines; check the spelling)"
        ) from exc
    except ValueError as exc:  # "'data_folder' is a !PLACEHOLDER and must be replaced."
        if "!PLACEHOLDER" not in str(exc):
            raise
        key = str(exc).split("'")[1]
        raise ConfigError(f"{hparams_file}: {key} must be given, e.g. --{key} <value>") from exc
    except DuplicateKeyError as exc:  # in the file: the command line's are found before
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
        raise ConfigError(f"{hparams_file} line {line}: {exc.problem}") from exc


def check_keys(hparams: dict[str, Any], required: Iterable[str], hparams_file: str) -> None:
    """ConfigError naming every key of ``required`` that ``hparams`` lacks."""
    missing = [key for key in required if key not in hparams]
    if missing:
        raise ConfigError(
            f"{hparams_file} lacks the key(s) {', '.join(missing)} that this recipe reads "
            "(compare with the configurations in hparams/)"
        )


def check_writable(folder: str | os.PathLike) -> None:
    """ConfigError unless ``folder`` can be created and written to."""
    path = Path(folder)
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"output_folder {path} cannot be written ({exc.strerror or exc}); choose another "
            "with --output_folder"
        ) from exc


def load_config(
    argv: list[str], required: Iterable[str] = ("output_folder",), write_output: bool = True
) -> tuple[str, dict[str, Any], RunOptions, str]:
    """``(hparams_file, hparams, run_opts, overrides)`` from a recipe's command line.

    Checks, before anything is prepared or written: no option is given twice, overrides name
    existing keys, no ``!PLACEHOLDER`` is left, the keys ``required`` (the recipe's ``KEYS``)
    are present, the device and precisions can run here (:func:`resolve_run_opts`),
    ``resume_from`` is a complete checkpoint, ``output_folder`` is writable (unless not
    ``write_output``). ``--resume PATTERN...`` sets ``resume_from`` to the newest complete
    checkpoint matched (:func:`newest_checkpoint`). Raises :class:`ConfigError`, after
    removing the output folders that loading created.
    """
    with _checked_config(argv, required, write_output) as loaded:
        hparams_file, hparams, run_opts, overrides, _ = loaded
        return hparams_file, hparams, run_opts, overrides


# The hparams of the run start_run started in this process, for cli's Ctrl-C line.
_started_run: dict[str, Any] | None = None


def start_run(
    argv: list[str],
    keys: Iterable[str],
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], RunOptions]:
    """``(hparams, run_opts)`` of a recipe run that is ready to train: :func:`load_config`,
    then ``check(hparams)`` (the recipe's own value checks) and that ``data_folder`` exists,
    before anything is written; then ``cpu_threads`` torch threads when the YAML sets it, the
    DDP process group, the experiment folder (hyperparams.yaml, log) and the manifests (main
    process). An error on the way removes the output folders it created."""
    global _started_run
    with _checked_config(argv, keys) as (hparams_file, hparams, run_opts, overrides, resume):
        _started_run = hparams
        if check is not None:
            check(hparams)
        threads = hparams.get("cpu_threads")  # optional key
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ConfigError(f"cpu_threads must be null or an integer >= 1, not {threads!r}")
        check_data_folder(hparams)
        if threads:
            torch.set_num_threads(threads)
        sb.utils.distributed.ddp_init_group(run_opts)
        sb.create_experiment_directory(
            experiment_directory=hparams["output_folder"],
            hyperparams_to_save=hparams_file,
            overrides=overrides,
        )
        if resume is not None and _first_process():
            logger.info(
                "--resume: the newest complete checkpoint matched is %s", hparams["resume_from"]
            )
        prepare_manifests(hparams)
    return hparams, run_opts


def cli(main: Callable[[list[str]], Any]) -> None:
    """Runs ``main(sys.argv[1:])``. A configuration or data-folder error, a checkpoint save
    that ran out of space, or a diverged run (``TrainingDiverged``, naming the checkpoint to
    resume from) becomes one ``error: ...`` line on stderr and exit status 2;
    Ctrl-C (KeyboardInterrupt) one line on where the same command resumes from
    (:func:`interrupt_message`; the main process only, as under torchrun every process gets
    the signal) and exit status 130. Other exceptions keep their traceback. An ``int``
    returned by ``main`` is the exit status."""
    def interrupted() -> None:
        if _first_process():
            print(interrupt_message(_started_run), file=sys.stderr, flush=True)

    run_main(
        main,
        (ConfigError, LibriSpeechPrepError, FileNotFoundError, CardError, CheckpointSpaceError,
         TrainingDiverged),
        interrupted,
    )


def split_command_line(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``(argv without --resume and its patterns, those patterns or None)``.

    ``--resume`` takes every following argument up to the next ``--option`` (a shell expands
    an unquoted glob into several paths). ConfigError for an option given twice, for
    ``--resume_from`` without a value (it would silently start a fresh run), for ``--resume``
    without a pattern, and for ``--resume`` together with ``--resume_from``.
    """
    rest: list[str] = []
    patterns: list[str] | None = None
    seen: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            rest.append(token)
            continue
        name, has_value, inline = token[2:].partition("=")
        if name == "resume":
            if has_value:
                given = [inline]
            else:
                given = list(_values_from(argv, i))
                i += len(given)
            if patterns is not None:
                raise ConfigError("--resume is given twice on the command line: give it once")
            patterns = [p for p in given if p]
            if not patterns:
                raise ConfigError(
                    "--resume needs a checkpoint folder or a pattern, e.g. --resume "
                    "'results/<run>/save/CKPT+*' (the newest complete one it matches)"
                )
            continue
        value = inline if has_value else next(_values_from(argv, i), None)
        if name in seen:
            values = "" if value is None else f" ({seen[name]}, then {value})"
            raise ConfigError(f"--{name} is given twice on the command line{values}: give it once")
        seen[name] = value
        if name == "resume_from" and not value:
            raise ConfigError(
                "--resume_from needs a checkpoint folder (<save_folder>/CKPT+...); without it "
                "the run would start afresh. Rerun without it to continue from this run's "
                "latest checkpoint"
            )
        rest.append(token)
    if patterns is not None and "resume_from" in seen:
        raise ConfigError("--resume and --resume_from both name where to resume: give one")
    return rest, patterns


def _values_from(argv: list[str], start: int) -> Iterator[str]:
    """The arguments of ``argv`` from ``start`` up to the next ``--option``."""
    for token in argv[start:]:
        if token.startswith("--"):
            return
        yield token


@contextlib.contextmanager
def _removed_on_error(folders: Iterable[Path]) -> Iterator[None]:
    """Runs the block; if it raises, removes those of ``folders`` that did not exist on entry
    and their parents made since (when empty): a run stopped by an error before it started
    leaves nothing behind. Main process only."""
    made = {}
    for folder in folders:
        new = [p for p in (folder, *folder.parents) if not p.exists()]
        if new:
            made[folder] = new
    try:
        yield
    except BaseException:
        if _first_process():
            for folder, new in made.items():
                shutil.rmtree(folder, ignore_errors=True)
                for parent in new[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()  # only if empty: another run may be writing there
        raise


def _output_folders(hparams_file: str, overrides: str) -> list[Path]:
    """The ``*_folder`` values except ``data_folder`` (the folders a run writes), read with
    references and overrides resolved, without building any object."""
    try:
        with open(hparams_file, encoding="utf-8") as f:
            config = YAML().load(resolve_references(f, overrides))
    except Exception:  # unreadable: loading reports it, before anything is created
        return []
    return [
        Path(value) for key, value in config.items()
        if key.endswith("_folder") and key != "data_folder" and isinstance(value, str)
    ]


@contextlib.contextmanager
def _checked_config(
    argv: list[str], required: Iterable[str], write_output: bool = True
) -> Iterator[tuple[str, dict[str, Any], RunOptions, str, list[str] | None]]:
    """Loads and checks the configuration of ``argv`` (see :func:`load_config`), then runs
    the block; an error in either removes the output folders made meanwhile. Yields
    ``(hparams_file, hparams, run_opts, overrides, --resume patterns or None)``."""
    argv, resume = split_command_line(argv)
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with _removed_on_error(_output_folders(hparams_file, overrides)):
        hparams = _load_yaml(hparams_file, overrides)
        check_keys(hparams, required, hparams_file)
        checkpointer = hparams.get("checkpointer")
        if resume is not None:
            check_keys(hparams, ["resume_from"], hparams_file)
            try:
                path = str(newest_checkpoint(resume, checkpointer))
            except FileNotFoundError as exc:
                raise ConfigError(str(exc)) from exc
            hparams["resume_from"] = path
            overrides = f"{overrides}\nresume_from: {json.dumps(path)}"  # in hyperparams.yaml
        pending = pending_resume(hparams.get("resume_from"), checkpointer)
        if pending is not None:
            try:
                checkpoint_from_dir(pending, checkpointer)
            except (FileNotFoundError, ValueError, yaml.YAMLError) as exc:
                raise ConfigError(f"resume_from: {str(exc).splitlines()[0]}") from exc
        run_opts = resolve_run_opts(run_opts, hparams)
        if write_output:
            check_writable(hparams["output_folder"])
        yield hparams_file, hparams, run_opts, overrides, resume


def _first_process() -> bool:
    """Rank 0 by the launcher's environment (SpeechBrain's ``if_main_process`` holds on every
    process until the DDP group exists)."""
    return get_rank() in (None, 0)


def interrupt_message(hparams: dict[str, Any] | None) -> str:
    """The line printed on Ctrl-C: where a rerun of the same command starts from, and that
    command (:func:`mamba_asr.commands.rerun_command`)."""
    command = rerun_command()
    if hparams is None:
        return f"interrupted before the run started: rerun the same command to start it: {command}"
    checkpointer = hparams.get("checkpointer")
    pending = pending_resume(hparams.get("resume_from"), checkpointer)
    if pending is not None:
        return (
            f"interrupted: rerun the same command to start again from {pending} "
            f"(resume_from): {command}"
        )
    try:
        latest = checkpointer.find_checkpoint() if checkpointer is not None else None
    except OSError:  # the save folder is gone (removed as new after an error) or unreadable
        latest = None
    if latest is None:
        return (
            "interrupted before the first checkpoint was saved: rerun the same command to "
            f"start the run again: {command}"
        )
    return (
        f"interrupted: rerun the same command to resume from {latest.path} (the latest "
        f"complete checkpoint): {command}"
    )


def resolve_run_opts(run_opts: RunOptions, hparams: dict[str, Any]) -> RunOptions:
    """``run_opts`` completed for this machine; call before ``ddp_init_group``.

    * Under ``torchrun`` without CUDA the DDP backend becomes ``gloo`` (SpeechBrain defaults
      to ``nccl``) unless ``--distributed_backend`` was given.
    * ``precision``/``eval_precision`` fp16 (command line or YAML) without CUDA raises
      :class:`PrecisionError` before any data is prepared; so does a CUDA ``--device`` on a
      machine without CUDA (:class:`ConfigError`).
    """
    overridden = set(run_opts.overridden_args)
    changes: dict[str, Any] = {}
    under_torchrun = os.environ.get("RANK") is not None and os.environ.get("LOCAL_RANK") is not None
    if (
        under_torchrun
        and not torch.cuda.is_available()
        and "distributed_backend" not in overridden
    ):
        changes["distributed_backend"] = "gloo"
        logger.info("torchrun without CUDA: using the gloo DDP backend")
    device = run_opts.device or infer_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device} asks for CUDA, but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu"
        )
    for key in ("precision", "eval_precision"):
        value = run_opts[key] if key in overridden else hparams.get(key, run_opts[key])
        if value == "fp16" and not str(device).startswith("cuda"):
            raise PrecisionError(
                f"{key} fp16 needs a CUDA GPU, but this run uses device {device!r}: "
                f"set {key} to bf16 (mixed precision on CPU) or fp32, e.g. --{key} bf16"
            )
    if not changes:
        return run_opts
    return dataclasses.replace(run_opts, **changes, overridden_args=overridden | set(changes))
