"""Text data of the LM recipe (``train_LM.py``): sentences from manifests and large text files,
bucketed into batches of similar length.

* :class:`TextCorpus`: sentences from a list and/or text files (one per line), read lazily
  through a byte-offset line index (:func:`_index_lines`), so a 40 M-line corpus such as
  ``librispeech-lm-norm.txt`` is never held in memory; tokenized on access.
* :class:`BucketBatchSampler`: batches of similar-length sentences within a padded-character
  budget, re-shuffled per epoch (``set_epoch``) and deterministic for a seed and epoch.
* :func:`dataio_prepare`: the train/valid/test corpora and their loader arguments from the
  LM YAML's keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from speechbrain.dataio.batch import PaddedBatch

from mamba_asr.tokenizer import read_sentences

logger = logging.getLogger(__name__)


def _index_lines(path: Path, max_chars: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Byte offsets and lengths of the non-empty lines of a text file (one pass, chunked)."""
    ends, pos = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 26):
            ends.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos)
            pos += len(chunk)
    ends.append(np.array([pos]))
    end = np.concatenate(ends).astype(np.int64)
    start = np.concatenate([[0], end[:-1] + 1]).astype(np.int64)
    length = end - start
    keep = length > 0
    too_long = int((keep & (length > max_chars)).sum()) if max_chars else 0
    if max_chars:
        keep &= length <= max_chars
    return start[keep], length[keep].astype(np.int32), too_long


class TextCorpus(torch.utils.data.Dataset):
    """Sentences from a list and/or text files (one per line), tokenized on access.

    Items: ``id``, ``tokens_bos`` ``[bos, t1..tn]``, ``tokens_eos`` ``[t1..tn, eos]``,
    ``n_words``. ``lengths`` (characters per sentence) drive the bucketing sampler.
    """

    def __init__(
        self,
        tokenizer: spm.SentencePieceProcessor,
        sentences: Sequence[str] = (),
        files: Sequence[str | os.PathLike] = (),
        bos_index: int = 1,
        eos_index: int = 2,
        uppercase: bool = True,
        max_chars: int | None = None,
    ):
        self.tokenizer, self.uppercase = tokenizer, uppercase
        self.bos, self.eos = bos_index, eos_index
        self.sentences = [s for s in sentences if s and (not max_chars or len(s) <= max_chars)]
        self.files = [Path(f) for f in files]
        lengths = [np.array([len(s) for s in self.sentences], dtype=np.int32)]
        self.offsets, counts = [], [len(self.sentences)]
        for file in self.files:
            if not file.is_file():
                raise FileNotFoundError(f"LM text file {file} does not exist (lm_corpus_files)")
            start, length, too_long = _index_lines(file, max_chars)
            logger.info(
                "%s: %d sentences (%d longer than %s characters skipped)",
                file,
                len(start),
                too_long,
                max_chars,
            )
            self.offsets.append(start)
            lengths.append(length)
            counts.append(len(start))
        self.lengths = np.concatenate(lengths)
        self.bounds = np.cumsum(counts)  # item i is in source searchsorted(bounds, i, "right")
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def text(self, i: int) -> str:
        """Sentence ``i``, whitespace-normalised (and upper-cased with ``uppercase``)."""
        source = int(np.searchsorted(self.bounds, i, side="right"))
        if source == 0:
            raw = self.sentences[i]
        else:
            if self._pid != os.getpid():  # a DataLoader worker: its own descriptors
                self._fds, self._pid = {}, os.getpid()
            if source not in self._fds:
                self._fds[source] = os.open(self.files[source - 1], os.O_RDONLY)
            offset = int(self.offsets[source - 1][i - int(self.bounds[source - 1])])
            chunk = os.pread(self._fds[source], int(self.lengths[i]), offset)
            raw = chunk.decode("utf-8", errors="replace")
        text = " ".join(raw.split())
        return text.upper() if self.uppercase else text

    def __getitem__(self, i: int) -> dict[str, Any]:
        text = self.text(i)
        ids = self.tokenizer.encode_as_ids(text)
        return {
            "id": str(i),
            "tokens_bos": torch.LongTensor([self.bos, *ids]),
            "tokens_eos": torch.LongTensor([*ids, self.eos]),
            "n_words": len(text.split()),
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length sentences, at most ``max_batch_length`` padded characters
    and ``max_batch_ex`` sentences each; shuffled per epoch (``set_epoch``), deterministic for
    a given seed and epoch (so an intra-epoch checkpoint resumes at the right batch). Memory is
    a few numpy arrays, whatever the corpus size."""

    def __init__(
        self,
        lengths: np.ndarray,
        max_batch_length: int,
        num_buckets: int = 50,
        max_batch_ex: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        self.lengths = np.asarray(lengths)
        self.max_batch_length, self.max_batch_ex = max_batch_length, max_batch_ex or 1 << 30
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        quantiles = np.linspace(0, 1, num_buckets + 1)[1:]
        self.boundaries = np.unique(np.quantile(self.lengths, quantiles).astype(np.int64))
        self._batches: list[np.ndarray] = []
        self._built_for: int | None = None

    @property
    def batches(self) -> list[np.ndarray]:
        """This epoch's batches (arrays of indices), built on first use."""
        if self._built_for != self.epoch:
            self._batches, self._built_for = self._make_batches(), self.epoch
        return self._batches

    def _make_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        bucket = np.searchsorted(self.boundaries, self.lengths[order], side="left")
        order = order[np.argsort(bucket, kind="stable")]
        counts = np.bincount(bucket, minlength=len(self.boundaries))
        batches = []
        for members, top in zip(
            np.split(order, np.cumsum(counts)[:-1]), self.boundaries, strict=True
        ):
            size = max(1, min(self.max_batch_ex, self.max_batch_length // max(int(top), 1)))
            batches.extend(members[k : k + size] for k in range(0, len(members), size))
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def dataio_prepare(hparams: dict[str, Any], tokenizer: spm.SentencePieceProcessor) -> dict:
    """The LM's corpora and loader arguments from its YAML keys: ``train`` (the ``wrd`` column
    of ``train_csv`` with ``use_train_transcripts``, plus ``lm_corpus_files``), ``valid``
    (``valid_csv``), ``test`` ({file stem: corpus} of ``test_csv``) and ``train_opts``,
    ``valid_opts``, ``test_opts``; with ``dynamic_batching`` the train loader takes a
    :class:`BucketBatchSampler` (``dynamic_batch_sampler_train``)."""
    common = {
        "bos_index": hparams["bos_index"],
        "eos_index": hparams["eos_index"],
        "uppercase": hparams["uppercase"],
    }
    transcripts = read_sentences(hparams["train_csv"]) if hparams["use_train_transcripts"] else []
    train = TextCorpus(
        tokenizer,
        transcripts,
        hparams["lm_corpus_files"] or (),
        max_chars=hparams["max_chars"],
        **common,
    )
    if len(train) == 0:
        raise ValueError("no LM training text: set use_train_transcripts or lm_corpus_files")
    logger.info("LM training text: %d sentences (%d transcripts)", len(train), len(transcripts))
    valid = TextCorpus(tokenizer, read_sentences(hparams["valid_csv"]), **common)
    tests = {
        Path(p).stem: TextCorpus(tokenizer, read_sentences(p), **common)
        for p in hparams["test_csv"]
    }

    train_opts = {**hparams["train_dataloader_opts"], "collate_fn": PaddedBatch}
    if hparams["dynamic_batching"]:
        sampler = BucketBatchSampler(
            train.lengths, seed=hparams["seed"], **hparams["dynamic_batch_sampler_train"]
        )
        train_opts = {
            "batch_sampler": sampler,
            "collate_fn": PaddedBatch,
            "num_workers": hparams["num_workers"],
        }
    return {
        "train": train,
        "valid": valid,
        "test": tests,
        "train_opts": train_opts,
        "valid_opts": {**hparams["valid_dataloader_opts"], "collate_fn": PaddedBatch},
        "test_opts": {**hparams["test_dataloader_opts"], "collate_fn": PaddedBatch},
    }
