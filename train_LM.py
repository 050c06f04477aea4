#!/usr/bin/env python3
"""Transformer language model for the S2S recipes' beam search, trained on LibriSpeech text.

Usage:
    python train_LM.py hparams/LM/demo.yaml                        # demo corpus, ~1 min on 2 CPUs
    python train_LM.py hparams/LM/transformer.yaml --data_folder /data/LibriSpeech \
        --lm_corpus_files "[/data/librispeech-lm-norm.txt]"
    torchrun --nproc_per_node=4 train_LM.py hparams/LM/transformer.yaml --data_folder ...
    python -m mamba_asr.ddp_run --nproc_per_node=4 train_LM.py ...   # the same as torchrun
    python -m mamba_asr.pretrained results/LM/demo/2223/export     # check the exported folder

Text: the ``wrd`` column of the training manifest (``use_train_transcripts``) plus any
``lm_corpus_files`` (``librispeech-lm-norm.txt`` format: one normalised sentence per line, read
lazily through a line index, so the 40 M-line corpus is never held in memory). Tokens: the
SentencePiece model of ``tokenizer_file``, or one trained once on the training manifest.
Training: next-token NLL (optional label smoothing); validation logs the token and word
perplexity of ``valid_csv`` each epoch in ``train_log.txt`` and keeps the best checkpoint;
rerunning the same command resumes. Finally the best checkpoint is tested on every
``test_csv`` and written to ``export_folder`` as ``lm.ckpt`` + ``tokenizer.ckpt`` +
``hyperparams.yaml``: the layout of SpeechBrain's asr-transformer-transformerlm-librispeech, so
an S2S config takes that folder as its pretrained LM/tokenizer path.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.distributed import if_main_process

from mamba_asr import data
from mamba_asr.pretrained import write_lm_folder
from mamba_asr.recipe import cli, start_run
from mamba_asr.tokenizer import read_sentences

logger = logging.getLogger(__name__)

# TransformerLM keyword arguments, read from the YAML keys of the same name (vocab from
# output_neurons); the export's hyperparams.yaml rebuilds the model from them.
ARCH_KEYS = (
    "d_model",
    "nhead",
    "num_encoder_layers",
    "num_decoder_layers",
    "d_ffn",
    "dropout",
    "activation",
    "normalize_before",
)
# The YAML keys this script reads (load_config checks a configuration has them all).
KEYS = (
    *data.PREP_KEYS, *ARCH_KEYS, "output_folder", "save_folder", "export_folder", "seed",
    "cpu_threads", "train_csv", "valid_csv", "test_csv", "lm_corpus_files",
    "use_train_transcripts", "uppercase", "max_chars", "tokenizer", "output_neurons",
    "bos_index", "eos_index", "dynamic_batching", "dynamic_batch_sampler_train", "num_workers",
    "train_dataloader_opts", "valid_dataloader_opts", "test_dataloader_opts", "model",
    "modules", "optimizer", "compute_cost", "log_softmax", "lr_annealing", "epoch_counter",
    "keep_checkpoints", "checkpointer", "train_logger",
)


class LM(sb.Brain):
    """Tokens ``[bos, t1..tn]`` -> log-probabilities of ``[t1..tn, eos]``."""

    tokenizer: spm.SentencePieceProcessor
    train_batch_sampler: BucketBatchSampler | None = None  # None with fixed-size batches
    test_name: str = "test"  # the test set being evaluated, for the log

    def compute_forward(self, batch, stage):
        """Batch -> log-probabilities (B, L, vocab)."""
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        logits = self.modules.model(tokens_bos)
        return self.hparams.log_softmax(logits)

    def compute_objectives(self, predictions, batch, stage):
        """Training: NLL with ``label_smoothing``; evaluation: plain NLL per token, summed up
        over the stage for the perplexities."""
        tokens_eos, tokens_lens = batch.tokens_eos
        if stage == sb.Stage.TRAIN:
            return self.hparams.compute_cost(predictions, tokens_eos, length=tokens_lens)
        nll = -predictions.gather(-1, tokens_eos.unsqueeze(-1)).squeeze(-1)  # (B, L)
        n_tok = torch.round(tokens_lens * tokens_eos.shape[1]).long()
        mask = torch.arange(tokens_eos.shape[1], device=nll.device)[None, :] < n_tok[:, None]
        nll_sum = (nll * mask).sum()
        self.nll_sum += float(nll_sum)
        self.n_tokens += int(mask.sum())
        self.n_words += sum(batch.n_words) + len(batch.n_words)  # words + one eos each
        return nll_sum / mask.sum()

    def on_fit_batch_start(self, batch, should_step):
        """Set this step's learning rate (Noam or linear warm-up) before the update."""
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        """Reset the perplexity sums; the bucketing sampler reshuffles per epoch."""
        self.nll_sum, self.n_tokens, self.n_words = 0.0, 0, 0
        if stage == sb.Stage.TRAIN and self.train_batch_sampler is not None:
            self.train_batch_sampler.set_epoch(epoch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log loss/perplexities; keep the checkpoint with the lowest validation NLL."""
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            return
        loss = self.nll_sum / max(self.n_tokens, 1)
        stats = {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "word ppl": math.exp(min(self.nll_sum / max(self.n_words, 1), 50.0)),
            "tokens": self.n_tokens,
        }
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr, "steps": self.optimizer_step},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"loss": loss, "ppl": stats["ppl"]},
                min_keys=["loss"],
                num_to_keep=self.hparams.keep_checkpoints,
            )
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={
                    "Epoch loaded": self.hparams.epoch_counter.current,
                    "test set": self.test_name,
                },
                test_stats=stats,
            )
            self.test_stats = stats


# --------------------------------------------------------------------------- data pipeline


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
    """Train/valid/test corpora and their loader arguments from the YAML keys."""
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
    sampler = None
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
        "sampler": sampler,
    }


def lm_arch(hparams: dict[str, Any]) -> dict[str, Any]:
    """TransformerLM keyword arguments of the YAML's model."""
    return {"vocab": hparams["output_neurons"], **{k: hparams[k] for k in ARCH_KEYS}}


def main(argv: list[str]) -> None:
    """Prepare manifests and tokenizer, train, test, export the best checkpoint."""
    hparams, run_opts = start_run(argv, KEYS)
    tokenizer = hparams["tokenizer"]()
    sets = dataio_prepare(hparams, tokenizer)

    lm_brain = LM(
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    lm_brain.tokenizer = tokenizer
    lm_brain.train_batch_sampler = sets["sampler"]
    lm_brain.fit(
        lm_brain.hparams.epoch_counter,
        sets["train"],
        sets["valid"],
        train_loader_kwargs=sets["train_opts"],
        valid_loader_kwargs=sets["valid_opts"],
    )
    for name, test_set in sets["test"].items():
        lm_brain.test_name = name
        lm_brain.evaluate(test_set, min_key="loss", test_loader_kwargs=sets["test_opts"])

    best = lm_brain.checkpointer.find_checkpoint(min_key="loss")
    if best is None:
        raise RuntimeError(f"no checkpoint in {hparams['save_folder']} to export")
    lm_brain.checkpointer.load_checkpoint(best)
    if if_main_process():
        folder = write_lm_folder(
            hparams["export_folder"],
            hparams["model"],  # the module itself, not its DDP wrapper
            tokenizer,
            lm_arch(hparams),
            info={"valid_ppl": round(best.meta["ppl"], 3), "checkpoint": best.path.name},
            bos_index=hparams["bos_index"],
            eos_index=hparams["eos_index"],
        )
        logger.info("exported %s (valid ppl %.2f)", folder, best.meta["ppl"])


if __name__ == "__main__":
    cli(main)
