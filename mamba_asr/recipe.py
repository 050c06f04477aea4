"""Run-time set-up and Brain behaviour the recipes share (``train_CTC.py``, ``train_S2S.py``,
``train_LM.py``, ``evaluate.py``).

* :func:`load_config`: command line -> (hparams, run options), every problem a
  :class:`ConfigError` naming the file/key/value: an option given twice, unknown override,
  unset placeholder, a key the recipe needs missing from the YAML, ``--resume_from`` without
  a checkpoint, unwritable ``output_folder``, CUDA or fp16 asked for without CUDA.
  ``--resume PATTERN...`` picks the newest complete checkpoint matched as ``resume_from``.
* :func:`start_run`: the start every recipe shares (config, threads, DDP group, experiment
  folder, manifests). Both check before they create: an error before the run starts leaves
  no output folder behind that was not there before.
* :func:`cli`: a recipe's ``__main__``: those errors become one ``error:`` line and exit
  status 2; Ctrl-C one ``interrupted:`` line naming the checkpoint the same command resumes
  from, and exit status 130.
* :func:`resolve_run_opts`: device-dependent run options, checked before anything runs
  (gloo for ``torchrun`` without CUDA, a clear error for fp16 without CUDA).
* :class:`TrainingBrain`: a SpeechBrain ``Brain`` with the training behaviour of every recipe
  (the LM's included); it

  - steps the Noam scheduler (``noam_annealing``) once per optimizer step actually taken;
  - skips optimizer steps whose gradients are not finite (non-finite loss included), counts
    them (``skipped_steps`` per epoch) and goes on; ``max_consecutive_nonfinite`` skipped
    steps in a row raise (the model has diverged);
  - re-shuffles its train batch sampler (one with ``set_epoch``: SpeechBrain's
    ``DynamicBatchSampler``, the LM's bucketing sampler) every epoch in a single process
    (SpeechBrain calls ``set_epoch`` only under DDP);
  - resumes from the latest checkpoint, or from ``resume_from`` (a ``CKPT+...`` folder) once;
  - logs each epoch (:meth:`~TrainingBrain.log_epoch`): lr, optimizer steps, skipped steps
    and, under DDP, the number of batches every process trained (``process_batches``), and
    each test (:meth:`~TrainingBrain.log_test`);
  - keeps the best checkpoints by :meth:`~TrainingBrain.best_key` (valid loss unless a
    recipe says otherwise).
* :class:`RecipeBrain`: the ``TrainingBrain`` of the ASR recipes, which adds WER/CER: it
  keeps the best ``avg_checkpoints`` by valid WER (the S2S recipe: ``keep_best_by``),
  evaluates their average (or that of ``eval_checkpoints``, set by ``evaluate.py``) and
  writes ``wer_<test-set>.txt`` / ``.json`` plus a one-line summary in the train log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import signal
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
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    METAFNAME,
    PARAMFILE_EXT,
    Checkpoint,
    average_checkpoints,
)
from speechbrain.utils.distributed import ddp_barrier, get_rank, if_main_process, infer_device
from speechbrain.utils.metric_stats import ErrorRateStats
from speechbrain.utils.run_opts import RunOptions

from mamba_asr.atomic import atomic_open
from mamba_asr.checkpoints import AtomicCheckpointer
from mamba_asr.commands import rerun_command
from mamba_asr.data import check_data_folder, prepare_manifests
from mamba_asr.librispeech import LibriSpeechPrepError
from mamba_asr.reports.scores import scores_path, write_scores

logger = logging.getLogger(__name__)

RESUME_MARKER = "resumed_from.txt"
# Keys TrainingBrain and start_run read (a recipe's KEYS add its own).
TRAINING_KEYS = (
    "output_folder", "resume_from", "max_consecutive_nonfinite", "epoch_counter",
    "train_logger", "checkpointer", "cpu_threads",
)
# Keys RecipeBrain reads (an ASR recipe's KEYS add data.DATA_KEYS and its own).
RECIPE_KEYS = (*TRAINING_KEYS, "avg_checkpoints", "model")


class ConfigError(ValueError):
    """The command line or the YAML asks for something that cannot run."""


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
    """Runs ``main(sys.argv[1:])``. A configuration or data-folder error becomes one
    ``error: ...`` line on stderr and exit status 2; Ctrl-C (KeyboardInterrupt) one line on
    where the same command resumes from (:func:`interrupt_message`; the main process only,
    as under torchrun every process gets the signal) and exit status 130. Other exceptions
    keep their traceback."""
    try:
        main(sys.argv[1:])
    except (ConfigError, LibriSpeechPrepError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # A second Ctrl-C (or torchrun passing the signal on) must not cut the line short, nor
        # objects interrupted half-built print their finalizers' errors (a DataLoader iterator
        # interrupted while starting its workers does).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.unraisablehook = lambda unraisable: None
        if _first_process():
            print(interrupt_message(_started_run), file=sys.stderr, flush=True)
        sys.exit(130)


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


def newest_checkpoint(patterns: list[str], checkpointer: Any = None) -> Path:
    """The newest (CKPT.yaml ``unixtime``, SpeechBrain's recency) complete checkpoint among
    the folders ``patterns`` match: ``CKPT+...`` folders, folders holding them (a save
    folder), or globs of either. Complete: :func:`checkpoint_from_dir` accepts it for
    ``checkpointer``. ConfigError naming the patterns and what they matched otherwise."""
    matched: list[Path] = []
    for pattern in patterns:
        for path in map(Path, sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]):
            inside = sorted(path.glob(f"{CKPT_PREFIX}+*")) if path.is_dir() else []
            matched += inside if inside and not (path / METAFNAME).exists() else [path]
    complete: list[Checkpoint] = []
    problems: list[str] = []
    for folder in dict.fromkeys(matched):
        try:
            ckpt = checkpoint_from_dir(folder, checkpointer)
        except (FileNotFoundError, ValueError, yaml.YAMLError) as exc:
            problems.append(str(exc).splitlines()[0])
            continue
        if not isinstance(ckpt.meta, dict) or "unixtime" not in ckpt.meta:
            problems.append(f"{folder}: {METAFNAME} is not checkpoint meta data")
            continue
        complete.append(ckpt)
    if complete:
        return Path(max(complete, key=lambda c: c.meta["unixtime"]).path)
    found = f"it matched {len(problems)}, none complete: {problems[0]}" if problems else (
        "it matched nothing"
    )
    raise ConfigError(
        f"--resume {' '.join(patterns)}: no complete checkpoint ({found}); expected "
        "<save_folder>/CKPT+<date>+<time>+<nn> folders"
    )


def pending_resume(path: str | os.PathLike | None, checkpointer: Any) -> Path | None:
    """``resume_from`` (``path``) when this run has still to start from it: given, and not
    both recorded as started from (its marker in the save folder) and followed by a
    checkpoint of this run (a run stopped before its first save starts from it again)."""
    if not path:
        return None
    if checkpointer is None:
        return Path(path)
    try:
        recorded = _resume_marker(checkpointer).read_text(encoding="utf-8").strip()
        started = recorded == str(Path(path).resolve())
        saved = started and checkpointer.find_checkpoint() is not None
    except OSError:  # no save folder (yet)
        saved = False
    return None if saved else Path(path)


def _resume_marker(checkpointer: Any) -> Path:
    """The file in the save folder naming the ``resume_from`` this run started from."""
    return Path(checkpointer.checkpoints_dir) / RESUME_MARKER


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
            path = str(newest_checkpoint(resume, checkpointer))
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


def checkpoint_from_dir(path: str | os.PathLike, checkpointer: Any = None) -> Checkpoint:
    """The SpeechBrain ``Checkpoint`` stored in the folder ``path`` (``CKPT+...``); checked
    complete for ``checkpointer``'s recoverables when it is an ``AtomicCheckpointer``."""
    folder = Path(path)
    meta_file = folder / METAFNAME
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a SpeechBrain checkpoint folder (no {METAFNAME} in it); "
            "expected <save_folder>/CKPT+<date>+<time>+<nn>"
        )
    if isinstance(checkpointer, AtomicCheckpointer):
        problem = checkpointer.check_checkpoint_dir(folder)
        if problem is not None:
            raise ValueError(f"checkpoint {folder} is incomplete: {problem}")
    meta = yaml.safe_load(meta_file.read_text(encoding="utf-8"))
    params = {f.stem: f for f in folder.iterdir() if f.suffix == PARAMFILE_EXT}
    return Checkpoint(folder, meta, params)


class TrainingBrain(sb.Brain):
    """``sb.Brain`` with the training behaviour every recipe shares (see the module docstring).

    Subclasses give their validation/test stats by overriding :meth:`eval_stats` (default: the
    loss), the checkpoint ranking by :meth:`best_key` and how many to keep by
    :meth:`checkpoints_to_keep`; overriding ``on_stage_start``/``on_stage_end`` they call
    ``super()``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_stepped = False
        self.skipped_steps = 0
        self.nonfinite_losses = 0
        self.test_set_name = "test"
        self.test_stats: dict[str, float] = {}
        self.train_stats: dict[str, float] = {}
        self.process_batches: list[int] = []
        self._consecutive_skips = 0
        self._epoch_sampler: torch.utils.data.Sampler | None = None

    # ------------------------------------------------------------------ data

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's, remembering a train batch sampler that has ``set_epoch`` (e.g. a
        ``DynamicBatchSampler``) to re-shuffle it every epoch."""
        sampler = loader_kwargs.get("batch_sampler")
        if stage == sb.Stage.TRAIN and callable(getattr(sampler, "set_epoch", None)):
            self._epoch_sampler = sampler
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        """Training: re-shuffles the batch sampler for ``epoch`` (deterministic from seed +
        epoch, so an intra-epoch resume sees the same batches) and resets the per-epoch
        counters."""
        if stage != sb.Stage.TRAIN:
            return
        self.skipped_steps = 0
        self.nonfinite_losses = 0
        # Under DDP SpeechBrain wraps the sampler and calls set_epoch itself.
        if self._epoch_sampler is not None and self.train_sampler is None:
            self._epoch_sampler.set_epoch(epoch)

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        """After training (on every process): keeps the train loss for :meth:`log_epoch` and
        gathers how many batches each process trained this epoch. After validation: logs the
        epoch and saves its checkpoint; after a test: logs the results (:meth:`log_test`),
        both with the stats of :meth:`eval_stats`."""
        if stage != sb.Stage.TRAIN:
            stats = self.eval_stats(stage_loss)
            if stage == sb.Stage.VALID:
                self.log_epoch(epoch, stats)
                self.save_epoch_checkpoint(epoch, stats)
            else:
                self.log_test(stats)
            return
        self.train_stats = {"loss": stage_loss}
        batches = [self.step]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            batches = [0] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(batches, self.step)
        self.process_batches = batches

    def eval_stats(self, stage_loss: float) -> dict[str, float]:
        """Validation/test stats, in train-log order (kept in the checkpoint's meta after
        validation): the loss; recipes that measure more override this."""
        return {"loss": stage_loss}

    def on_fit_batch_end(self, batch: Any, outputs: Any, loss: Any, should_step: bool) -> None:
        """Steps ``noam_annealing`` (when the config has one) once per optimizer step taken."""
        scheduler = getattr(self.hparams, "noam_annealing", None)
        if scheduler is not None and should_step and self.optimizer_stepped:
            scheduler(self.optimizer)

    def best_key(self) -> tuple[str, bool]:
        """(checkpoint meta key, whether higher is better) by which checkpoints are kept and
        ranked: the valid loss, lower is better; recipes may override."""
        return "loss", False

    def checkpoints_to_keep(self) -> int:
        """How many of the best checkpoints by :meth:`best_key` are kept (besides the
        latest); each recipe names its YAML key."""
        raise NotImplementedError(f"{type(self).__name__} must define checkpoints_to_keep")

    def save_epoch_checkpoint(self, epoch: int, valid_stats: dict[str, float]) -> None:
        """Saves the end-of-epoch checkpoint (meta: ``epoch`` and ``valid_stats``) and keeps
        the :meth:`checkpoints_to_keep` best by :meth:`best_key`."""
        key, higher = self.best_key()
        self.checkpointer.save_and_keep_only(
            meta={**valid_stats, "epoch": epoch},
            max_keys=[key] if higher else None,
            min_keys=None if higher else [key],
            num_to_keep=self.checkpoints_to_keep(),
        )

    def log_epoch(self, epoch: int, valid_stats: dict[str, float]) -> None:
        """One train-log line: ``epoch: N, lr: ..., steps: ..., skipped_steps: ...[,
        process_batches: B0 B1 ...] - train loss: ... - valid loss: ..., valid ...``."""
        meta: dict[str, Any] = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": self.optimizer_step,
            "skipped_steps": self.skipped_steps,
        }
        if len(self.process_batches) > 1:
            meta["process_batches"] = " ".join(map(str, self.process_batches))
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=self.train_stats, valid_stats=valid_stats
        )

    def log_test(self, stats: dict[str, float]) -> None:
        """Keeps ``stats`` as ``test_stats`` and logs ``Epoch loaded: N, test set: <name> -
        test ...`` to the train log."""
        self.test_stats = stats
        self.hparams.train_logger.log_stats(
            stats_meta={
                "Epoch loaded": self.hparams.epoch_counter.current,
                "test set": self.test_set_name,
            },
            test_stats=stats,
        )

    # ------------------------------------------------------------------ resuming

    def on_fit_start(self) -> None:
        """Resumes from ``resume_from`` the first time it is given, else from the latest
        checkpoint of this run (a rerun of the same command continues where it stopped)."""
        ckpt = self._explicit_resume()
        if ckpt is None:
            super().on_fit_start()
            return
        self._compile()
        self._wrap_distributed()
        self.init_optimizers()
        logger.info("resuming from %s (resume_from)", ckpt.path)
        self.checkpointer.load_checkpoint(ckpt)

    def _explicit_resume(self) -> Checkpoint | None:
        """The ``resume_from`` checkpoint unless this run already started from it and saved
        a checkpoint since (:func:`pending_resume`)."""
        path = self.hparams.resume_from
        if not path or self.checkpointer is None:
            return None
        pending = pending_resume(path, self.checkpointer)
        ddp_barrier()  # every process has decided before the marker changes
        if pending is None:  # (the named checkpoint may since have been deleted as not the best)
            logger.info("this run already started from %s: resuming from its latest", path)
            return None
        ckpt = checkpoint_from_dir(pending, self.checkpointer)
        if if_main_process():
            with atomic_open(_resume_marker(self.checkpointer), "w", encoding="utf-8") as f:
                f.write(f"{pending.resolve()}\n")
        return ckpt

    # ------------------------------------------------------------------ non-finite steps

    def check_loss_isfinite(self, loss: torch.Tensor) -> None:
        """Counts a non-finite loss; its step is skipped in :meth:`optimizers_step`."""
        if not torch.isfinite(loss):
            self.nonfinite_losses += 1
            logger.warning("non-finite loss (%s): this step will be skipped", loss.item())

    def optimizers_step(self) -> None:
        """Unscale, clip to ``max_grad_norm`` and step, unless the gradient norm is not finite.

        Under DDP the gradients are already reduced, so every process skips the same steps.
        """
        if self.opt_class is None:
            return
        opts = list(self.freeze_optimizers(self.optimizers_dict).values())
        for opt in opts:
            self.scaler.unscale_(opt)
        params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = bool(torch.isfinite(norm))
        if finite or self.scaler.is_enabled():  # GradScaler skips non-finite steps itself
            for opt in opts:
                self.scaler.step(opt)
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.optimizer_stepped = finite
        if finite:
            self.optimizer_step += 1
            self._consecutive_skips = 0
            return
        self.skipped_steps += 1
        self._consecutive_skips += 1
        logger.warning(
            "gradient norm %s is not finite: step skipped (%d this epoch)",
            norm.item(), self.skipped_steps,
        )
        limit = self.hparams.max_consecutive_nonfinite
        if self._consecutive_skips >= limit:
            raise RuntimeError(
                f"{self._consecutive_skips} optimizer steps in a row had non-finite gradients "
                f"(max_consecutive_nonfinite: {limit}): training has diverged; lower lr_model, "
                "raise n_warmup_steps or use fp32, then resume with --resume_from <CKPT dir>"
            )


class RecipeBrain(TrainingBrain):
    """The ``TrainingBrain`` of the ASR recipes: WER/CER (see the module docstring).

    Subclasses fill ``wer_metric``/``cer_metric`` in ``compute_objectives`` outside training;
    other validation/test stats come from overriding :meth:`eval_stats`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_checkpoints: list[Checkpoint] | None = None
        self.wer_file: Path | None = None
        self._loaded_for_eval: tuple[Path, ...] | None = None

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        """Validation and test: fresh ``wer_metric``/``cer_metric``."""
        super().on_stage_start(stage, epoch)
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.wer_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        """After a test: writes the results (:meth:`report_test`)."""
        if stage == sb.Stage.TEST:
            self.report_test(self.eval_stats(stage_loss), self.wer_metric)
            return
        super().on_stage_end(stage, stage_loss, epoch)

    def eval_stats(self, stage_loss: float) -> dict[str, float]:
        """Validation/test stats, in train-log order: loss, CER and WER (%); recipes that
        measure more override this."""
        return {
            "loss": stage_loss,
            "CER": self.cer_metric.summarize("error_rate"),
            "WER": self.wer_metric.summarize("error_rate"),
        }

    def best_key(self) -> tuple[str, bool]:
        """Checkpoints are kept, ranked and averaged by valid WER, lower is better; recipes
        may override."""
        return "WER", False

    def checkpoints_to_keep(self) -> int:
        """``avg_checkpoints``: the best checkpoints are the ones averaged for testing."""
        return self.hparams.avg_checkpoints

    # ------------------------------------------------------------------ evaluation

    def on_evaluate_start(self, max_key: str | None = None, min_key: str | None = None) -> None:
        """Loads the best checkpoint (``eval_checkpoints[0]`` when set) and the average of the
        ``model`` recoverable over the best ``avg_checkpoints`` (or all ``eval_checkpoints``),
        ranked by the key given, else by :meth:`best_key`."""
        if max_key is None and min_key is None:
            key, higher = self.best_key()
            max_key, min_key = (key, None) if higher else (None, key)
        if self.eval_checkpoints is not None:
            ckpts = self.eval_checkpoints
        elif self.checkpointer is not None:
            ckpts = self.checkpointer.find_checkpoints(
                max_key=max_key, min_key=min_key, max_num_checkpoints=self.hparams.avg_checkpoints
            )
        else:
            ckpts = []
        if not ckpts:
            logger.warning("no checkpoint to evaluate: using the current weights")
            return
        key = tuple(Path(c.path) for c in ckpts)
        if key == self._loaded_for_eval:
            return
        self.checkpointer.load_checkpoint(ckpts[0])
        self.step = 0  # an intra-epoch checkpoint restores a mid-epoch step count
        if len(ckpts) > 1:
            state = average_checkpoints(ckpts, recoverable_name="model")
            self.hparams.model.load_state_dict(state, strict=True)
        logger.info("evaluating the average of %d checkpoint(s): %s", len(ckpts), ", ".join(
            Path(c.path).name for c in ckpts))
        self._loaded_for_eval = key

    def evaluate_test_sets(
        self,
        datasets: dict[str, Any],
        loader_kwargs: dict[str, Any],
        out_dir: str | os.PathLike,
    ) -> dict[str, dict[str, float]]:
        """``evaluate`` every test set (the best checkpoints by :meth:`best_key`, averaged);
        writes ``<out_dir>/wer_<name>.txt`` and ``.json``; returns the stats by set name."""
        results = {}
        for name, data in datasets.items():
            self.test_set_name = name
            self.wer_file = Path(out_dir) / f"wer_{name}.txt"
            self.evaluate(data, test_loader_kwargs=dict(loader_kwargs))
            results[name] = dict(self.test_stats)
        return results

    def report_test(self, stats: dict[str, float], wer_metric: ErrorRateStats) -> None:
        """Writes ``self.wer_file`` (SpeechBrain's alignments, for reading), the per-utterance
        WER and CER scores as JSON beside it (``wer_<name>.json``, what the report tools read)
        and logs ``Epoch loaded: N, test set: <name> - test loss: ..., test CER: ..., test
        WER: ..., test utterances: N`` to the train log."""
        self.log_test({**stats, "utterances": len(wer_metric.scores)})
        logger.info(
            "%s: WER %.2f %%, CER %.2f %% (%d utterances)",
            self.test_set_name, stats["WER"], stats["CER"], len(wer_metric.scores),
        )
        if self.wer_file is not None and if_main_process():
            with atomic_open(self.wer_file, "w", encoding="utf-8") as f:
                wer_metric.write_stats(f)
            metrics = {"WER": wer_metric, "CER": self.cer_metric}
            write_scores(scores_path(self.wer_file), self.test_set_name, metrics)
