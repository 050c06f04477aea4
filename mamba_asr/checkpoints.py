"""Crash-safe checkpoints: :class:`AtomicCheckpointer`, a drop-in for SpeechBrain's Checkpointer.

SpeechBrain 1.1 writes ``CKPT.yaml`` before the parameter files of a checkpoint, so a process
killed during a save leaves a newest ``CKPT+…`` folder that recovery picks and crashes on.
``AtomicCheckpointer`` takes the same arguments (in YAML:
``checkpointer: !new:mamba_asr.checkpoints.AtomicCheckpointer``) and writes the same format,
which plain SpeechBrain reads. It differs in:

* Saving: every file of a checkpoint goes into a hidden folder
  ``.CKPT+<name>.tmp-<host>-<pid>-<random>`` of ``checkpoints_dir`` (SpeechBrain only looks at
  names starting with ``CKPT``): the parameter files, then ``CKPT.yaml``, each fsync'ed; one
  ``os.rename`` then publishes the folder, so a ``CKPT+…`` folder is complete or absent. Only the
  main process creates, renames and deletes folders (``if_main_process``); the save hooks run on
  every process as in SpeechBrain (the default ones only write on the main process, savers
  registered with ``save_on_main_only=False`` write into the broadcast hidden folder). Saving
  again under an existing custom ``name`` moves the old folder aside (``.old-…``) first.
* Deleting (keep-only): a folder is renamed to a hidden ``.del-…`` name before being removed.
* Cleaning: hidden folders of a killed save or deletion (their process is gone from this host,
  or they were untouched for an hour) are removed at the next save or recovery, with a warning;
  an ``.old-…`` folder whose checkpoint is absent is renamed back instead.
* Listing: a ``CKPT+…`` folder that is incomplete anyway (written by plain SpeechBrain and
  killed, or damaged) is skipped with a warning naming the folder and the file: ``CKPT.yaml``
  unreadable, the ``.ckpt`` file of a recoverable missing (unless SpeechBrain would tolerate
  that: ``allow_partial_load``, optional recoverables, dataloaders), a torch file truncated
  (the ``.ckpt`` files of torch-saved recoverables must be intact zip archives). So
  ``find_checkpoint(s)``, ``recover_if_possible`` and keep-only use the next complete one and
  never delete an incomplete one. Such folders are left in place, not renamed: a missing file
  may also mean that the recoverables changed since; delete them by hand.
* Recovery: when loading a listed checkpoint raises, ``recover_if_possible`` warns and loads the
  next one (which loads every recoverable again). If every candidate raises it re-raises the
  first error instead of starting from scratch (it is likely a model/config mismatch).
* Integrity: ``CKPT.yaml`` records the sha256 of every file of the checkpoint (``sha256:
  {model.ckpt: <hex>, ...}``, computed on a background thread while the save goes on: the
  next file is serialised, this one fsync'ed). Listing, ``find_checkpoint(s)`` (what
  recovery, keep-only, ``evaluate.py`` and ``export.py`` choose from) and
  ``check_checkpoint_dir`` verify the files of the checkpoints they return and skip one whose
  file changed since (a flipped byte inside a tensor loads silently otherwise), with one
  warning naming the file; such a folder is left in place. ``find_checkpoints`` hashes only
  down its ranking until it has the checkpoints asked for, and digests are cached per process
  by path, size and mtime (seeded at save), so keep-only does not rehash the kept ones at
  every save. Checkpoints without ``sha256`` (older runs, plain SpeechBrain) are not verified.
* Full disk: a save that fails for lack of space (``ENOSPC``/``EDQUOT``, or torch's zip writer
  failing while the save folder has less free space than the checkpoint needs) removes its
  hidden folder and raises :class:`CheckpointSpaceError`, one line saying how much the
  checkpoint needs, how much is free and that the previous checkpoints are intact.

Test hook: the environment variable ``MAMBA_ASR_KILL_DURING_SAVE=<n>`` makes the process SIGKILL
itself right after the n-th checkpoint file that it writes (counted over all its saves; a save
writes one ``.ckpt`` per recoverable, then ``CKPT.yaml``), and ``=<s>:<n>`` right after the n-th
file of its s-th save. Meant for tests only.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from speechbrain.utils import distributed as sb_dist
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    DEFAULT_SAVE_HOOKS,
    METAFNAME,
    PARAMFILE_EXT,
    Checkpoint,
    Checkpointer,
    ckpt_recency,
    get_default_hook,
    torch_save,
    torch_save_once_per_node,
)

from mamba_asr.atomic import atomic_open
from mamba_asr.model_card import sha256_file

logger = logging.getLogger(__name__)

KILL_ENV = "MAMBA_ASR_KILL_DURING_SAVE"
STALE_AFTER_S = 3600.0  # a hidden folder untouched this long is stale whoever made it
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format
HIDDEN_KINDS = {"tmp": "save", "old": "save", "del": "deletion"}
_HIDDEN_RE = re.compile(
    rf"^\.(?P<final>{re.escape(CKPT_PREFIX)}\+.+)\.(?P<kind>tmp|old|del)-"
    r"(?P<host>.+)-(?P<pid>\d+)-\w+$"
)
_TORCH_SAVERS = (torch_save, torch_save_once_per_node)
DIGESTS_KEY = "sha256"  # CKPT.yaml: {file name relative to the folder: sha256 hex digest}
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What torch's zip writer raises when a write fails (it keeps no errno): "[enforce fail at
# inline_container.cc:...] . unexpected pos ...", "... file write failed", or on closing the
# file "basic_ios::clear: iostream error".
_TORCH_WRITE_FAILED = re.compile(r"inline_container|unexpected pos|write failed|iostream error")
# Digests of files this process hashed or wrote: (path, size, mtime_ns, inode) -> sha256 hex.
_DIGEST_CACHE: dict[tuple[str, int, int, int], str] = {}


class CheckpointSpaceError(OSError):
    """A checkpoint save failed for lack of space; the message is one line for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class AtomicCheckpointer(Checkpointer):
    """SpeechBrain's Checkpointer with atomic saves and deletions, and listing and recovery that
    skip incomplete checkpoints (see the module docstring). Same arguments as SpeechBrain's."""

    def __init__(
        self,
        checkpoints_dir: str | os.PathLike,
        recoverables: Mapping[str, Any] | None = None,
        custom_load_hooks: Mapping[str, Callable] | None = None,
        custom_save_hooks: Mapping[str, Callable] | None = None,
        allow_partial_load: bool = False,
    ) -> None:
        super().__init__(
            checkpoints_dir, recoverables, custom_load_hooks, custom_save_hooks, allow_partial_load
        )
        self._reported: set[Path] = set()  # incomplete or damaged folders already warned about
        self._damaged: set[Path] = set()  # folders whose files do not match their sha256
        self._unverified_listing = False  # list_checkpoints leaves the hashing to the caller

    # ------------------------------------------------------------------ saving

    def save_checkpoint(
        self,
        meta: Mapping[str, Any] | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
        verbosity: int = logging.INFO,
    ) -> Checkpoint | None:
        """Saves every recoverable, then ``CKPT.yaml``, into a hidden folder and renames it into
        place. Returns the Checkpoint on the main process and None on the others."""
        main = sb_dist.if_main_process()
        dirs = None
        if main:
            self.remove_stale_temporaries()
            if name is None:
                final = self._new_checkpoint_dirpath()
            else:
                final = self._custom_checkpoint_dirpath(name)
            tmp = self.checkpoints_dir / _hidden_name(final.name, "tmp")
            tmp.mkdir()
            dirs = (tmp, final)
            _KillSwitch.new_save()
        tmp, final = sb_dist.ddp_broadcast(dirs, src=0)
        hasher = _Hasher(tmp) if main else None
        try:
            for rec_name, obj in self.recoverables.items():
                path = tmp / f"{rec_name}{PARAMFILE_EXT}"
                self._save_hook(rec_name, obj)(obj, path)
                if hasher is not None and path.exists():
                    hasher.add(path)  # hashed while the file is fsync'ed and the next written
                    _fsync_tree(path)
                    _KillSwitch.file_written(path)
            sb_dist.ddp_barrier()  # every process has written its part
            if hasher is not None:
                digests = hasher.digests()
                saved_meta = _write_meta(tmp / METAFNAME, meta, end_of_epoch, digests)
                _KillSwitch.file_written(tmp / METAFNAME)
                self._publish(tmp, final)
                _remember_digests(final, digests)
        except BaseException as err:
            if hasher is not None:
                hasher.close()
                shutil.rmtree(tmp, ignore_errors=True)
                space_error = self._space_error(err)
                if space_error is not None:
                    raise space_error from err
            raise
        finally:
            if hasher is not None:
                hasher.close()
        sb_dist.ddp_barrier()  # the checkpoint is in place when save_checkpoint returns
        if not main:
            return None
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, "Saved an %s checkpoint in %s", kind, final)
        paramfiles = {n: final / f"{n}{PARAMFILE_EXT}" for n in self.recoverables}
        return Checkpoint(final, saved_meta, paramfiles)

    def save_and_keep_only(
        self,
        meta: Mapping[str, Any] | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
        num_to_keep: int = 1,
        keep_recent: bool = True,
        importance_keys: Sequence[Callable[[Checkpoint], Any]] | None = None,
        max_keys: Sequence[str] | None = None,
        min_keys: Sequence[str] | None = None,
        ckpt_predicate: Callable[[Checkpoint], bool] | None = None,
        verbosity: int = logging.INFO,
    ) -> None:
        """Saves a checkpoint, then deletes the least important ones (as SpeechBrain's, without
        appending to a shared default ``importance_keys`` list)."""
        self.save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name, verbosity=verbosity)
        keys = list(importance_keys or []) + ([ckpt_recency] if keep_recent else [])
        self.delete_checkpoints(
            num_to_keep=num_to_keep,
            max_keys=max_keys,
            min_keys=min_keys,
            importance_keys=keys,
            ckpt_predicate=ckpt_predicate,
            verbosity=verbosity,
        )

    def delete_checkpoints(
        self,
        *,
        num_to_keep: int = 1,
        min_keys: Sequence[str] | None = None,
        max_keys: Sequence[str] | None = None,
        importance_keys: Sequence[Callable[[Checkpoint], Any]] | None = None,
        ckpt_predicate: Callable[[Checkpoint], bool] | None = None,
        verbosity: int = logging.INFO,
    ) -> None:
        """Keeps the ``num_to_keep`` best checkpoints of each order (lowest ``min_keys``, highest
        ``max_keys``, highest ``importance_keys``, default: most recent) among those passing
        ``ckpt_predicate`` and deletes the rest of those; each deletion is a rename first."""
        if num_to_keep < 0:
            raise ValueError("Number of checkpoints to keep must be positive.")
        if importance_keys is None:
            importance_keys = [ckpt_recency]
        orders: list[dict[str, Any]] = [{"min_key": k} for k in min_keys or []]
        orders += [{"max_key": k} for k in max_keys or []]
        orders += [{"importance_key": k} for k in importance_keys]
        sb_dist.ddp_barrier()  # no process is still saving or reading
        if sb_dist.if_main_process():
            candidates: set[Checkpoint] = set()
            kept: set[Checkpoint] = set()
            for order in orders:
                ranked = self._ranked(ckpt_predicate=ckpt_predicate, **order)
                candidates.update(ranked)
                kept.update(itertools.islice(filter(self._intact, ranked), num_to_keep))
            damaged = {c for c in candidates if c.path in self._damaged}  # left in place
            for ckpt in sorted(candidates - kept - damaged, key=lambda c: str(c.path)):
                hidden = ckpt.path.with_name(_hidden_name(ckpt.path.name, "del"))
                os.rename(ckpt.path, hidden)
                shutil.rmtree(hidden)
                logger.log(verbosity, "Deleted checkpoint in %s", ckpt.path)
        sb_dist.ddp_barrier()

    def remove_stale_temporaries(self) -> list[Path]:
        """On the main process, removes the hidden folders of killed saves and deletions and
        renames back a checkpoint that a killed save had moved aside; returns the folders."""
        handled: list[Path] = []
        if not sb_dist.if_main_process():
            return handled
        for path in sorted(self.checkpoints_dir.iterdir()):
            match = _HIDDEN_RE.match(path.name)
            if match is None or not path.is_dir():
                continue
            if not _is_stale(path, match["host"], int(match["pid"])):
                continue
            final = self.checkpoints_dir / match["final"]
            what = HIDDEN_KINDS[match["kind"]]
            if match["kind"] == "old" and not final.exists():
                os.rename(path, final)
                logger.warning("restored checkpoint %s, moved aside by a killed save", final)
            else:
                shutil.rmtree(path, ignore_errors=True)
                logger.warning("removed %s, left by a killed checkpoint %s", path, what)
            handled.append(path)
        return handled

    # ------------------------------------------------------------------ listing, recovery

    def list_checkpoints(self) -> list[Checkpoint]:
        """SpeechBrain's, without incomplete or damaged checkpoints (each one warned about
        once)."""
        ckpts = []
        for path in self._list_checkpoint_dirs():
            ckpt, problem = self._inspect(path)
            if ckpt is not None:
                ckpts.append(ckpt)
            elif problem is not None and path not in self._reported:
                self._reported.add(path)
                logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
        if self._unverified_listing:
            return ckpts
        return [c for c in ckpts if self._intact(c)]

    def find_checkpoints(
        self,
        importance_key: Callable[[Checkpoint], Any] | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: Callable[[Checkpoint], bool] | None = None,
        max_num_checkpoints: int | None = None,
    ) -> list[Checkpoint]:
        """SpeechBrain's, verifying the files only of the checkpoints it returns: down the
        ranking until ``max_num_checkpoints`` (default: all) verify."""
        ranked = self._ranked(importance_key, max_key, min_key, ckpt_predicate)
        return list(itertools.islice(filter(self._intact, ranked), max_num_checkpoints))

    def find_checkpoint(
        self,
        importance_key: Callable[[Checkpoint], Any] | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: Callable[[Checkpoint], bool] | None = None,
    ) -> Checkpoint | None:
        """SpeechBrain's (the best checkpoint, or None), verifying only down to the first that
        verifies."""
        found = self.find_checkpoints(importance_key, max_key, min_key, ckpt_predicate, 1)
        return found[0] if found else None

    def check_checkpoint_dir(self, path: str | os.PathLike) -> str | None:
        """What makes the checkpoint folder ``path`` incomplete for these recoverables or
        damaged (a file not matching its recorded sha256), or None."""
        ckpt, problem = self._inspect(Path(path))
        return problem if ckpt is None else _digest_problem(ckpt)

    def recover_if_possible(
        self,
        importance_key: Callable[[Checkpoint], Any] | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: Callable[[Checkpoint], bool] | None = None,
    ) -> Checkpoint | None:
        """Loads the best complete checkpoint (default: the most recent), falling back to the
        next one when loading raises; returns it, or None when there is none."""
        self.remove_stale_temporaries()
        ranked = self._ranked(importance_key, max_key, min_key, ckpt_predicate)
        errors: list[BaseException] = []
        for ckpt in filter(self._intact, ranked):
            try:
                self.load_checkpoint(ckpt)
            except Exception as err:
                logger.warning(
                    "could not load checkpoint %s (%s: %s); trying the next one",
                    ckpt.path,
                    type(err).__name__,
                    err,
                )
                errors.append(err)
                continue
            if errors:
                logger.warning("recovered from the older checkpoint %s", ckpt.path)
            return ckpt
        if errors:
            raise RuntimeError(
                f"none of the {len(errors)} checkpoints in {self.checkpoints_dir} could be loaded"
            ) from errors[0]
        logger.info("Would load a checkpoint here, but none found yet.")
        return None

    # ------------------------------------------------------------------ internals

    def _ranked(
        self,
        importance_key: Callable[[Checkpoint], Any] | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: Callable[[Checkpoint], bool] | None = None,
    ) -> list[Checkpoint]:
        """The complete checkpoints in SpeechBrain's order for these keys, files unverified."""
        self._unverified_listing = True
        try:
            return super().find_checkpoints(importance_key, max_key, min_key, ckpt_predicate)
        finally:
            self._unverified_listing = False

    def _intact(self, ckpt: Checkpoint) -> bool:
        """Whether ``ckpt``'s files match their recorded sha256; warns once when not."""
        problem = _digest_problem(ckpt)
        if problem is None:
            return True
        self._damaged.add(ckpt.path)
        if ckpt.path not in self._reported:
            self._reported.add(ckpt.path)
            logger.warning("skipping damaged checkpoint %s: %s", ckpt.path, problem)
        return False

    def _space_error(self, err: BaseException) -> CheckpointSpaceError | None:
        """The one-line error for a save that ``err`` ended for lack of space, else None."""
        if isinstance(err, OSError):
            if err.errno not in NO_SPACE_ERRNOS:
                return None
        elif not (isinstance(err, RuntimeError) and _TORCH_WRITE_FAILED.search(str(err))):
            return None
        try:
            complete = self._ranked()  # newest first
            if complete:
                need = _tree_bytes(Path(complete[0].path))
            else:
                need = sum(_state_bytes(obj) for obj in self.recoverables.values())
            free = shutil.disk_usage(self.checkpoints_dir).free
        except OSError:
            return None
        if not isinstance(err, OSError) and free >= need:
            return None  # torch's writer failed for another reason
        return CheckpointSpaceError(
            f"no space left in {self.checkpoints_dir}: the checkpoint needs about "
            f"{_megabytes(need)} MB and {_megabytes(free)} MB are free; the previous "
            "checkpoints are intact: free space and rerun the same command to resume"
        )

    def _save_hook(self, name: str, obj: Any) -> Callable:
        hook = self.custom_save_hooks.get(name) or get_default_hook(obj, DEFAULT_SAVE_HOOKS)
        if hook is None:
            raise RuntimeError(
                f"Don't know how to save {type(obj)}: register a default hook or add a custom "
                "hook for this object."
            )
        return hook

    def _publish(self, tmp: Path, final: Path) -> None:
        """Renames the complete folder ``tmp`` to ``final`` (swapping out an existing one)."""
        _fsync(tmp)
        old = None
        if final.exists():  # a custom name saved before
            old = final.with_name(_hidden_name(final.name, "old"))
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(self.checkpoints_dir)
        if old is not None:
            shutil.rmtree(old)

    def _inspect(self, path: Path) -> tuple[Checkpoint | None, str | None]:
        """The checkpoint in ``path`` and None, or None and what is wrong with it (None and
        None when the folder vanished meanwhile)."""
        try:
            text = (path / METAFNAME).read_text(encoding="utf-8")
            entries = list(path.iterdir())
        except FileNotFoundError:
            return None, None
        try:
            meta = yaml.safe_load(text)
        except yaml.YAMLError as err:
            return None, f"{METAFNAME} is unreadable ({str(err).splitlines()[0]})"
        if not isinstance(meta, dict) or not {"unixtime", "end-of-epoch"} <= meta.keys():
            return None, f"{METAFNAME} is truncated or not checkpoint meta data"
        paramfiles = {p.stem: p for p in entries if p.suffix == PARAMFILE_EXT}
        for name in self.recoverables:
            if name not in paramfiles and not self._may_be_missing(name):
                return None, f"{name}{PARAMFILE_EXT} is missing"
        for name, file in sorted(paramfiles.items()):
            problem = _torch_file_problem(file, expect_torch=self._saved_by_torch(name))
            if problem is not None:
                return None, f"{file.name} {problem}"
        return Checkpoint(path, meta, paramfiles), None

    def _may_be_missing(self, name: str) -> bool:
        """Whether SpeechBrain's loading tolerates a checkpoint without this recoverable."""
        return (
            self.allow_partial_load
            or "dataloader" in name
            or bool(self.optional_recoverables.get(name, False))
        )

    def _saved_by_torch(self, name: str) -> bool:
        obj = self.recoverables.get(name)
        if obj is None or name in self.custom_save_hooks:
            return False
        return get_default_hook(obj, DEFAULT_SAVE_HOOKS) in _TORCH_SAVERS


class _KillSwitch:
    """The ``MAMBA_ASR_KILL_DURING_SAVE`` test hook: counts this process's checkpoint files."""

    saves = 0
    files = 0
    files_in_save = 0

    @classmethod
    def new_save(cls) -> None:
        cls.saves += 1
        cls.files_in_save = 0

    @classmethod
    def file_written(cls, path: Path) -> None:
        cls.files += 1
        cls.files_in_save += 1
        spec = os.environ.get(KILL_ENV, "").strip()
        if not spec:
            return
        save, _, nth = spec.rpartition(":")
        if save:
            hit = cls.saves == int(save) and cls.files_in_save == int(nth)
        else:
            hit = cls.files == int(nth)
        if hit:
            print(f"{KILL_ENV}={spec}: SIGKILL after writing {path}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _hidden_name(final_name: str, kind: str) -> str:
    """``.<final_name>.<kind>-<host>-<pid>-<random>``: invisible to SpeechBrain's listing."""
    return f".{final_name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_meta(
    path: Path, meta: Mapping[str, Any] | None, end_of_epoch: bool, digests: dict[str, str]
) -> dict:
    """Writes ``CKPT.yaml`` as SpeechBrain does (``unixtime``, ``end-of-epoch``, then ``meta``),
    with the files' sha256 ``digests`` under ``DIGESTS_KEY``."""
    saved = {
        "unixtime": time.time(), "end-of-epoch": end_of_epoch, **(meta or {}),
        DIGESTS_KEY: digests,
    }
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("# yamllint disable\n")
        f.write(yaml.dump(saved))
    return saved


class _Hasher:
    """sha256 of the files of a save in the hidden folder ``root``, each computed on a
    background thread from the moment it is written (reading and hashing release the GIL, so
    it overlaps the fsync and the serialisation of the next file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-sha256")
        self._jobs: dict[str, Future[str]] = {}

    def add(self, path: Path) -> None:
        """Starts hashing the file ``path`` (or every file below the folder ``path``)."""
        for file in _files(path):
            name = file.relative_to(self.root).as_posix()
            self._jobs[name] = self._pool.submit(sha256_file, file)

    def digests(self) -> dict[str, str]:
        """``{file name relative to root: sha256}`` of every file in root (those other
        processes wrote are hashed now)."""
        for file in _files(self.root):
            if file.relative_to(self.root).as_posix() not in self._jobs:
                self.add(file)
        return {name: job.result() for name, job in sorted(self._jobs.items())}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _files(path: Path) -> Iterator[Path]:
    """``path`` when it is a file, else the files below it."""
    if not path.is_dir():
        yield path
        return
    for dirpath, _, names in os.walk(path):
        for name in sorted(names):
            yield Path(dirpath) / name


def _cache_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def _remember_digests(folder: Path, digests: Mapping[str, str]) -> None:
    """Caches the digests computed while saving into ``folder``: not hashed again to verify."""
    for name, digest in digests.items():
        _DIGEST_CACHE[_cache_key(folder / name)] = digest


def _cached_sha256(path: Path) -> str:
    key = _cache_key(path)
    if key not in _DIGEST_CACHE:
        _DIGEST_CACHE[key] = sha256_file(path)
    return _DIGEST_CACHE[key]


def _digest_problem(ckpt: Checkpoint) -> str | None:
    """Which file of ``ckpt`` does not match the sha256 its ``CKPT.yaml`` records, or None
    (also when it records none: saved by plain SpeechBrain or before digests were kept)."""
    recorded = ckpt.meta.get(DIGESTS_KEY) if isinstance(ckpt.meta, dict) else None
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        return f"{METAFNAME}'s {DIGESTS_KEY} is not a mapping of file names to digests"
    for name, digest in sorted(recorded.items()):
        try:
            actual = _cached_sha256(Path(ckpt.path) / str(name))
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != digest:
            return f"{name} does not match the sha256 recorded when it was saved"
    return None


def _tree_bytes(path: Path) -> int:
    """The bytes of the files of ``path``."""
    return sum(f.stat().st_size for f in _files(path))


def _state_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj``'s state dict (what saving it writes, roughly)."""
    state_dict = getattr(obj, "state_dict", None)
    return _tensor_bytes(state_dict()) if callable(state_dict) else 0


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return _tensor_bytes(list(value.values()))
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}" if n < 1e7 else f"{n / 1e6:.0f}"


def _torch_file_problem(path: Path, expect_torch: bool) -> str | None:
    """Why the ``.ckpt`` file ``path`` is damaged: a zip archive (torch.save's format) that
    does not open, or no zip at all where torch.save wrote it; None if it looks fine."""
    if not path.is_file():
        return None  # a saver may write a folder
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
        if magic != ZIP_MAGIC:
            return "is empty or truncated (not a torch zip archive)" if expect_torch else None
        with zipfile.ZipFile(path):
            pass
    except FileNotFoundError:
        return "is missing"
    except zipfile.BadZipFile:
        return "is truncated or corrupt (bad zip archive)"
    return None


def _is_stale(path: Path, host: str, pid: int) -> bool:
    """Whether the process that made hidden folder ``path`` is gone (or it is old)."""
    if host == socket.gethostname() and (pid == os.getpid() or not _pid_alive(pid)):
        return True
    return time.time() - _newest_mtime(path) > STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _newest_mtime(root: Path) -> float:
    try:
        return max(
            os.stat(os.path.join(dirpath, f)).st_mtime
            for dirpath, _, files in os.walk(root)
            for f in [".", *files]
        )
    except (FileNotFoundError, ValueError):
        return time.time()  # being changed right now


def _fsync(path: str | os.PathLike) -> None:
    """fsync a file, or a folder (its entries) where the platform allows that."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync ``path`` and, when it is a folder, everything below it."""
    if path.is_dir():
        for dirpath, _, files in os.walk(path):
            for f in files:
                _fsync(os.path.join(dirpath, f))
            _fsync(dirpath)
    else:
        _fsync(path)
