"""The training set read from shards (:class:`ShardDataset`) and its loader
(:class:`ShardLoader`).

A loader worker reads the shards the epoch's plan gives it (:mod:`mamba_asr.shards.plan`)
through :class:`~mamba_asr.shards.fetch.ShardFetcher` and WebDataset's tar iteration and
sample grouping, shuffles the samples in a buffer, sorts a bucket of them by duration, cuts
it into batches as SpeechBrain's ``DynamicBatchSampler`` counts them (at most
``max_batch_length`` seconds of padded audio and ``max_batch_ex`` utterances; or
``batch_size`` utterances without dynamic batching), shuffles those batches, and applies the
recipe's pipelines and collate function. Each batch records how many utterances of which
shard it holds (``batch.shard_counts``); utterances filtered out (``avoid_if_longer_than``)
and skipped shards reach the loader as :class:`Notice` items, which it does not pass on.

The loader asks every process, before each batch, whether it has one (an all-reduce MIN):
when one process is out, all end the epoch, so that every process trains the same number of
batches; what the others had left is counted (``dropped_batches``, ``dropped_utterances``).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from speechbrain.utils.data_pipeline import DataPipeline
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from mamba_asr.audio_io import AudioBytes
from mamba_asr.collectives import gather
from mamba_asr.shards.fetch import ShardFetcher, ShardUnavailable
from mamba_asr.shards.index import ShardIndex, ShardInfo
from mamba_asr.shards.plan import process_shards, worker_shards

logger = logging.getLogger(__name__)

STATIC_KEYS = ["id", "duration", "wav", "spk_id", "wrd"]
SHUFFLE_BUFFER = 500  # samples (compressed audio bytes) a worker shuffles among
BUCKET = 200  # samples sorted by duration and cut into batches at a time


@dataclass
class Notice:
    """What a worker tells the loader besides batches: utterances read but not batched (by
    shard) and shards skipped."""

    consumed: Counter = field(default_factory=Counter)
    skipped: tuple[str, ...] = ()


@dataclass
class EpochPlan:
    """What the loader sets before each epoch: the epoch, this process and its workers, and
    the shards already read in this epoch before a resume."""

    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    exclude: frozenset[str] = frozenset()


class ShardDataset(IterableDataset):
    """The utterances of the shards of ``index`` (items ``id``, ``duration``, ``wav`` (the
    audio file's bytes, :class:`~mamba_asr.audio_io.AudioBytes`), ``spk_id``, ``wrd``), with
    dynamic items as SpeechBrain's ``DynamicItemDataset`` (:meth:`add_dynamic_item`,
    :meth:`set_output_keys`), iterated as collated batches (see the module docstring)."""

    def __init__(
        self,
        index: ShardIndex,
        cache: str | os.PathLike,
        retries: int,
        seed: int,
        max_duration: float | None = None,
        max_batch_length: float | None = None,
        max_batch_ex: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if (max_batch_length is None) == (batch_size is None):
            raise ValueError("give max_batch_length (dynamic batching) or batch_size")
        self.index = index
        self.cache = str(cache)
        self.retries = retries
        self.seed = seed
        self.max_duration = max_duration
        self.max_batch_length = max_batch_length
        self.max_batch_ex = max_batch_ex or float("inf")
        self.batch_size = batch_size
        self.pipeline = DataPipeline(STATIC_KEYS)
        self.collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None
        self.plan = EpochPlan()

    def __len__(self) -> int:
        """Utterances in the index (what ``max_skipped_fraction`` counts against)."""
        return self.index.utterances

    def add_dynamic_item(self, func: Callable, takes: Any = None, provides: Any = None) -> None:
        """As ``DynamicItemDataset.add_dynamic_item``."""
        self.pipeline.add_dynamic_item(func, takes, provides)

    def set_output_keys(self, keys: Any) -> None:
        """As ``DynamicItemDataset.set_output_keys``."""
        self.pipeline.set_output_keys(keys)

    def my_shards(self, worker: int) -> list[ShardInfo]:
        """The shards loader worker ``worker`` of this process reads this epoch."""
        p = self.plan
        return worker_shards(self.index.shards, self.seed, p.epoch, p.rank, p.world_size,
                             worker, p.num_workers, p.exclude)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        notes: list[Notice] = []
        samples = self._samples(self.my_shards(worker), worker, notes)
        p = self.plan
        rng = random.Random(f"batches-{self.seed}-{p.epoch}-{p.rank}-{worker}")
        shuffled = shuffle(SHUFFLE_BUFFER, SHUFFLE_BUFFER // 2, rng=rng)(samples)
        for bucket in _chunks(shuffled, BUCKET):
            batches = self.cut_batches(bucket)
            rng.shuffle(batches)
            for batch in batches:
                yield from notes
                notes.clear()
                yield self._collate(batch)
        yield from notes

    def cut_batches(self, samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """``samples`` as batches: sorted by duration, at most ``max_batch_length`` padded
        seconds (longest x count) and ``max_batch_ex`` utterances each; or ``batch_size``
        utterances in the given order without dynamic batching."""
        if self.batch_size is not None:
            return [samples[i:i + self.batch_size] for i in range(0, len(samples),
                                                                   self.batch_size)]
        batches: list[list[dict[str, Any]]] = [[]]
        for sample in sorted(samples, key=lambda s: s["duration"]):
            n = len(batches[-1]) + 1
            if batches[-1] and (n > self.max_batch_ex
                                or n * sample["duration"] > self.max_batch_length):
                batches.append([])
            batches[-1].append(sample)
        return [b for b in batches if b]

    def _collate(self, samples: list[dict[str, Any]]) -> Any:
        examples = [self.pipeline.compute_outputs({k: s[k] for k in STATIC_KEYS})
                    for s in samples]
        batch = self.collate_fn(examples) if self.collate_fn is not None else examples
        counts = Counter(s["shard"] for s in samples)
        try:
            batch.shard_counts = counts
        except AttributeError:  # a plain list (no collate function): wrap it
            batch = _Examples(batch, counts)
        return batch

    def _samples(self, shards: list[ShardInfo], worker: int,
                 notes: list[Notice]) -> Iterator[dict[str, Any]]:
        """The samples of ``shards`` in order, without those longer than ``max_duration``
        (counted in ``notes``); a shard that cannot be had is skipped with a warning."""
        fetcher = ShardFetcher(self.index, self.cache, self.retries)
        for shard in shards:
            logger.info("rank %d worker %d reads shard %s (epoch %d)", self.plan.rank, worker,
                        shard.name, self.plan.epoch)
            try:
                path = fetcher.local(shard)
            except ShardUnavailable as exc:
                logger.warning("skipping shard %s: %s", shard.name, exc)
                notes.append(Notice(skipped=(shard.name,)))
                continue
            with open(path, "rb") as f:
                for sample in group_by_keys(tar_file_expander([{"url": shard.name,
                                                                 "stream": f}])):
                    item = _utterance(sample, shard.name)
                    if self.max_duration and item["duration"] > self.max_duration:
                        notes.append(Notice(consumed=Counter({shard.name: 1})))
                        continue
                    yield item


class _Examples(list):
    """A batch of uncollated examples that can carry ``shard_counts``."""

    def __init__(self, examples: list, counts: Counter) -> None:
        super().__init__(examples)
        self.shard_counts = counts


def _utterance(sample: dict[str, Any], shard: str) -> dict[str, Any]:
    """A grouped WebDataset sample as the items the pipelines take; ValueError naming the
    shard and key when it lacks its JSON or audio member."""
    key = sample.get("__key__")
    try:
        meta = json.loads(sample["json"])
        audio = next(v for k, v in sample.items() if not k.startswith("__") and k != "json")
        return {"id": meta["id"], "duration": float(meta["duration"]),
                "wav": AudioBytes(audio, f"{shard}:{meta['id']}"), "spk_id": meta["speaker"],
                "wrd": meta["words"], "shard": shard}
    except (KeyError, StopIteration, ValueError) as exc:
        raise ValueError(f"shard {shard}, key {key}: expected <key>.json (id, duration, "
                         f"words, speaker) and one audio member ({exc!r})") from exc


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _identity(item: Any) -> Any:
    return item


def all_have(flag: bool) -> bool:
    """Whether every process has ``flag`` (all-reduce MIN; ``flag`` outside DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = "cpu"
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class EpochStats:
    """This process's count of utterances trained, of skipped shards and of batches/utterances
    left unread when another process ran out first."""

    utterances: int = 0
    skipped_shards: list[str] = field(default_factory=list)
    dropped_batches: int = 0
    dropped_utterances: int = 0


class ShardLoader:
    """The train loader of a :class:`ShardDataset`: a ``DataLoader`` (``batch_size=None``,
    ``num_workers`` workers) per epoch, every process stopping at the same batch (see the
    module docstring); ``progress`` (a
    :class:`~mamba_asr.shards.training.ShardProgress`) records the shards read."""

    def __init__(self, dataset: ShardDataset, num_workers: int, collate_fn: Callable,
                 progress: Any) -> None:
        dataset.collate_fn = collate_fn
        self.dataset = dataset
        self.num_workers = num_workers
        self.progress = progress
        self.epoch = 0
        self.stats = EpochStats()

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration plans for (shuffled shards, batches)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        rank, world = dist_info()
        exclude = self.progress.start(self.epoch)
        plan = process_shards(self.dataset.index.shards, self.dataset.seed, self.epoch, world,
                              exclude)
        if rank == 0:
            logger.info(
                "epoch %d: %d shards to read%s; shards per process: %s", self.epoch,
                sum(map(len, plan)),
                f" ({len(exclude)} read before the resume)" if exclude else "",
                " ".join(str(len(p)) for p in plan))
        self.dataset.plan = EpochPlan(self.epoch, rank, world, max(self.num_workers, 1),
                                      exclude)
        self.stats = EpochStats()
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity)
        batches = self._batches(loader)
        while True:
            batch = next(batches, None)
            if not all_have(batch is not None):
                if batch is not None:
                    for left in [batch, *batches]:
                        self.stats.dropped_batches += 1
                        self.stats.dropped_utterances += sum(left.shard_counts.values())
                    logger.info("epoch %d: another process ran out of batches; %d batches "
                                "(%d utterances) of this one dropped", self.epoch,
                                self.stats.dropped_batches, self.stats.dropped_utterances)
                return
            self.progress.consume(batch.shard_counts)
            self.stats.utterances += sum(batch.shard_counts.values())
            yield batch

    def _batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The batches of ``loader``; its notices go to ``progress`` and ``stats``."""
        for item in loader:
            if isinstance(item, Notice):
                self.progress.consume(item.consumed)
                self.stats.skipped_shards.extend(item.skipped)
            else:
                yield item

    def epoch_stats(self) -> dict[str, int]:
        """``shard_utterances`` (batched for training, unreadable ones included),
        ``skipped_shards``, ``dropped_batches``, ``dropped_utterances`` of the last epoch,
        summed over the processes (every process calls this)."""
        mine = (self.stats.utterances, len(self.stats.skipped_shards),
                self.stats.dropped_batches, self.stats.dropped_utterances)
        total = [sum(x) for x in zip(*gather(mine), strict=True)]
        names = ("shard_utterances", "skipped_shards", "dropped_batches", "dropped_utterances")
        return dict(zip(names, total, strict=True))
