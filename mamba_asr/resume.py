"""Where a run resumes from: checkpoint folders named on the command line (``resume_from``,
``--resume PATTERN...``) and the marker a run keeps of the one it started from.

* :func:`checkpoint_from_dir`: the SpeechBrain ``Checkpoint`` in a ``CKPT+...`` folder, checked
  complete.
* :func:`newest_checkpoint`: the newest complete checkpoint among folders, save folders or
  globs (``--resume``).
* :func:`pending_resume`: whether a run has still to start from its ``resume_from`` (the marker
  ``RESUME_MARKER`` in its save folder, and a checkpoint of its own since).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import yaml
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, PARAMFILE_EXT, Checkpoint

from mamba_asr.checkpoints import AtomicCheckpointer
from mamba_asr.command_line import ConfigError

RESUME_MARKER = "resumed_from.txt"


def newest_checkpoint(patterns: list[str], checkpointer: Any = None) -> Path:
    """The newest (CKPT.yaml ``unixtime``, SpeechBrain's recency) complete checkpoint among
    the folders ``patterns`` match: ``CKPT+...`` folders, folders holding them (a save
    folder), or globs of either. Complete: :func:`checkpoint_from_dir` accepts it for
    ``checkpointer``. FileNotFoundError naming the patterns and what they matched
    otherwise."""
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
    raise FileNotFoundError(
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
        recorded = resume_marker(checkpointer).read_text(encoding="utf-8").strip()
        started = recorded == str(Path(path).resolve())
        saved = started and checkpointer.find_checkpoint() is not None
    except OSError:  # no save folder (yet)
        saved = False
    return None if saved else Path(path)


def resume_marker(checkpointer: Any) -> Path:
    """The file in the save folder naming the ``resume_from`` this run started from."""
    return Path(checkpointer.checkpoints_dir) / RESUME_MARKER


def checkpoint_from_dir(path: str | os.PathLike, checkpointer: Any = None) -> Checkpoint:
    """The SpeechBrain ``Checkpoint`` stored in the folder ``path`` (``CKPT+...``); checked
    complete for ``checkpointer``'s recoverables, and its files against their recorded sha256,
    when it is an ``AtomicCheckpointer`` (ConfigError naming the file otherwise)."""
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
            raise ConfigError(f"checkpoint {folder} is incomplete or damaged: {problem}")
    meta = yaml.safe_load(meta_file.read_text(encoding="utf-8"))
    params = {f.stem: f for f in folder.iterdir() if f.suffix == PARAMFILE_EXT}
    return Checkpoint(folder, meta, params)
