"""The ``Brain`` side of training from shards: :class:`ShardTraining` (a mixin of
``RecipeBrain``) builds the :class:`~mamba_asr.shards.dataset.ShardLoader`, re-plans it every
epoch, gathers the shards every process has read into each intra-epoch checkpoint
(:class:`ShardProgress`, so that a resumed epoch reads only the others) and adds
``skipped_shards``, ``dropped_batches`` and ``dropped_utterances`` to the epoch's log line."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import speechbrain as sb
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from mamba_asr.collectives import gather
from mamba_asr.shards.dataset import ShardDataset, ShardLoader
from mamba_asr.shards.index import ShardIndex

logger = logging.getLogger(__name__)


@register_checkpoint_hooks
class ShardProgress:
    """Which shards were read whole in the current epoch: this process's (``done``, from
    the utterances consumed per shard) and, at the last checkpoint, every process's."""

    def __init__(self, index: ShardIndex) -> None:
        self.sizes = {s.name: s.utterances for s in index.shards}
        self.epoch: int | None = None
        self.consumed: Counter = Counter()
        self.done: set[str] = set()
        self.gathered: set[str] = set()
        self._resume: tuple[int, frozenset[str]] | None = None

    def start(self, epoch: int) -> frozenset[str]:
        """A new epoch; returns the shards to leave out: those a checkpoint of this same
        epoch recorded as read (a resumed run), else none."""
        exclude = frozenset()
        if self._resume is not None and self._resume[0] == epoch:
            exclude = self._resume[1]
        self._resume = None
        self.epoch = epoch
        self.consumed = Counter()
        self.done = set(exclude)
        self.gathered = set(exclude)
        return exclude

    def consume(self, counts: Counter) -> None:
        """Counts utterances consumed (trained, filtered out or unreadable) per shard."""
        self.consumed.update(counts)
        for name in counts:
            if self.consumed[name] >= self.sizes[name]:
                self.done.add(name)

    def gather(self) -> None:
        """Every process's done shards into ``gathered`` (every process calls this)."""
        self.gathered = set().union(*map(set, gather(sorted(self.done))))

    @mark_as_saver
    def save_progress(self, path: str) -> None:
        """Checkpoint saver: the epoch and the read shards of all processes (JSON)."""
        state = {"epoch": self.epoch, "done": sorted(self.gathered | self.done)}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    @mark_as_loader
    def load_progress(self, path: str, end_of_epoch: bool) -> None:
        """Checkpoint loader: an intra-epoch checkpoint's read shards are left out when that
        epoch runs again (:meth:`start`); an end-of-epoch one changes nothing."""
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not end_of_epoch and state["epoch"] is not None:
            self._resume = (int(state["epoch"]), frozenset(state["done"]))
            logger.info("resuming epoch %d: %d shards already read", state["epoch"],
                        len(state["done"]))


class ShardTraining(sb.Brain):
    """Mixin of a ``TrainingBrain`` subclass (before it in the bases): training from a
    :class:`~mamba_asr.shards.dataset.ShardDataset` (see the module docstring)."""

    shard_loader: ShardLoader | None = None
    shard_stats: dict[str, int] = {}

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """A :class:`ShardLoader` for a training ``ShardDataset`` (its ``num_workers`` and
        ``collate_fn`` from ``loader_kwargs``); other datasets as before."""
        if stage != sb.Stage.TRAIN or not isinstance(dataset, ShardDataset):
            return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        progress = ShardProgress(dataset.index)
        loader = ShardLoader(dataset, loader_kwargs.get("num_workers", 0),
                             loader_kwargs.get("collate_fn"), progress)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("shard_progress", progress, optional_load=True)
        self._epoch_sampler = loader  # set_epoch every epoch (TrainingBrain.on_stage_start)
        self.shard_loader = loader
        return loader

    def _save_intra_epoch_ckpt(self) -> None:
        """Gathers every process's read shards, then SpeechBrain saves (on the main one)."""
        if self.shard_loader is not None:
            self.shard_loader.progress.gather()
        super()._save_intra_epoch_ckpt()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """After training: the epoch's shard counts over all processes."""
        if stage == sb.Stage.TRAIN and self.shard_loader is not None:
            self.shard_stats = self.shard_loader.epoch_stats()
        super().on_stage_end(stage, stage_loss, epoch)

    def epoch_meta(self) -> dict[str, Any]:
        """The epoch line's fields, plus the shard counts when training from shards."""
        meta = super().epoch_meta()
        if self.shard_loader is not None:
            meta.update(self.shard_stats)
        return meta
