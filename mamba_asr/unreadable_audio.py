"""Utterances whose audio cannot be decoded in the middle of a run (a file truncated after its
header, say): dropped from their batch instead of ending the run, counted, and a run stopped
with one line when too many are.

* The audio pipelines (:func:`mamba_asr.data.add_audio_pipelines`) give an
  :class:`UnreadableAudio` marker as an utterance's ``sig`` when ``load_audio`` raises
  ``AudioError`` (in the loader workers).
* :func:`collate_readable`, the ASR loaders' ``collate_fn``, drops the marked utterances with
  all their items (tokens, words) and records them on the batch (``batch.skipped``); a batch
  with no readable utterance is an :class:`UnreadableBatch` (length 0).
* :class:`SkippedUtterances` counts them per stage, warns once per file, and raises
  :class:`UnreadableAudioError` when a stage skips more than ``max_skipped_fraction`` of its
  utterances (:func:`unreadable_batch_error` for a wholly unreadable training batch under DDP,
  which cannot be skipped by one process alone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from speechbrain.dataio.batch import PaddedBatch

from mamba_asr.command_line import ConfigError

logger = logging.getLogger(__name__)

MAX_SKIPPED_KEY = "max_skipped_fraction"
MAX_SKIPPED_DEFAULT = 0.01  # the configurations' value; runs trained before the key use it
_NAMED_FILES = 3  # files named in the error


@dataclass(frozen=True)
class UnreadableAudio:
    """What an audio pipeline gives instead of a waveform for a file it cannot decode."""

    file: str
    reason: str


class SkippedUtterance(NamedTuple):
    """An utterance dropped from its batch: its ID, audio file and why it could not be read."""

    id: str
    file: str
    reason: str


class UnreadableAudioError(ConfigError):
    """Unreadable audio that stops a run: more of a stage's utterances than
    ``max_skipped_fraction`` allows, or a whole training batch under DDP."""


@dataclass
class UnreadableBatch:
    """A batch none of whose utterances could be read: nothing to compute on."""

    skipped: list[SkippedUtterance] = field(default_factory=list)

    def __len__(self) -> int:
        return 0

    @property
    def batchsize(self) -> int:
        """0, as ``len()``."""
        return 0

    def to(self, *args: Any, **kwargs: Any) -> UnreadableBatch:
        """Nothing to move."""
        return self

    def pin_memory(self) -> UnreadableBatch:
        """Nothing to pin."""
        return self


def collate_readable(examples: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
    """The loaders' ``collate_fn``: SpeechBrain's ``PaddedBatch`` of the examples without an
    :class:`UnreadableAudio` item (``kwargs`` go to it), with ``skipped`` (the
    :class:`SkippedUtterance` of each one dropped), or an :class:`UnreadableBatch` when every
    example has one."""
    readable, skipped = [], []
    for example in examples:
        marker = next((v for v in example.values() if isinstance(v, UnreadableAudio)), None)
        if marker is None:
            readable.append(example)
        else:
            skipped.append(SkippedUtterance(str(example.get("id")), marker.file, marker.reason))
    if not readable:
        return UnreadableBatch(skipped)
    batch = PaddedBatch(readable, **kwargs)
    batch.skipped = skipped  # kept by .to() and .pin_memory(), which return the batch itself
    return batch


class SkippedUtterances:
    """The utterances a brain skipped, per stage (``TRAIN``, ``VALID``, ``TEST``), against
    the size of the stage's data set; each file is warned about once per process."""

    def __init__(self) -> None:
        self.sizes: dict[Any, int] = {}
        self.by_stage: dict[Any, list[SkippedUtterance]] = {}
        self.warned: set[str] = set()

    def start(self, stage: Any) -> None:
        """A new epoch (or test set) of ``stage``: its count starts again from 0."""
        self.by_stage[stage] = []

    def count(self, stage: Any) -> int:
        """How many utterances ``stage`` skipped since it started."""
        return len(self.by_stage.get(stage, ()))

    def add(self, stage: Any, skipped: Sequence[SkippedUtterance], max_fraction: float) -> None:
        """Counts ``skipped`` for ``stage`` and warns about each file not warned about yet.

        Raises UnreadableAudioError as soon as the stage has skipped more than
        ``max_fraction`` of its data set's utterances (known to be too many whatever the
        rest of the epoch holds)."""
        done = self.by_stage.setdefault(stage, [])
        for utt in skipped:
            done.append(utt)
            if utt.file not in self.warned:
                self.warned.add(utt.file)
                logger.warning(
                    "skipping utterance %s: %s: %s (%d skipped so far in this %s stage)",
                    utt.id, utt.file, utt.reason, len(done), _stage_name(stage),
                )
        size = self.sizes.get(stage)
        if skipped and size and len(done) > max_fraction * size:
            raise UnreadableAudioError(self._limit_message(stage, size, max_fraction))

    def _limit_message(self, stage: Any, size: int, max_fraction: float) -> str:
        done = self.by_stage[stage]
        return (
            f"{len(done)} of the {size} utterances of this {_stage_name(stage)} stage could not "
            f"be read, more than {MAX_SKIPPED_KEY} {max_fraction:g} allows "
            f"({_named_files(done)}); replace "
            f"or remove the damaged files and prepare again, or raise {MAX_SKIPPED_KEY} above "
            f"{len(done) / size:.3g} to go on without them"
        )


def unreadable_batch_error(batch: UnreadableBatch) -> UnreadableAudioError:
    """The error of a training batch none of whose utterances could be read, under DDP: every
    process must take the same optimizer steps, so one process cannot skip the batch alone."""
    return UnreadableAudioError(
        f"no utterance of a training batch could be read ({_named_files(batch.skipped)}); "
        "with several processes (DDP) such a batch cannot be skipped: replace or remove the "
        "damaged files and prepare again, then rerun the same command to resume"
    )


def _named_files(skipped: Sequence[SkippedUtterance]) -> str:
    """The first few files of ``skipped``, each once, and how many more."""
    files = list(dict.fromkeys(utt.file for utt in skipped))
    more = len(files) - _NAMED_FILES
    return ", ".join(files[:_NAMED_FILES]) + (f" and {more} more" if more > 0 else "")


def _stage_name(stage: Any) -> str:
    """``training``, ``validation`` or ``test`` for SpeechBrain's ``Stage``."""
    name = getattr(stage, "name", str(stage))
    return {"TRAIN": "training", "VALID": "validation", "TEST": "test"}.get(name, name.lower())

