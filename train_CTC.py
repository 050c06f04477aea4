#!/usr/bin/env python3
"""CTC recipe: Conformer / ConMamba encoder with a character CTC head on LibriSpeech.

Usage:
    python train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder /data/LibriSpeech
    python train_CTC.py hparams/CTC/demo.yaml --data_folder data/demo        # 2-core CPU demo
    torchrun --nproc_per_node=2 train_CTC.py hparams/CTC/conformer_large.yaml --data_folder ...
    python -m mamba_asr.ddp_run --nproc_per_node=2 train_CTC.py hparams/CTC/conformer_large.yaml \
        --data_folder ...                                       # the same, as guides write it
    python train_CTC.py hparams/CTC/conformer_streaming_demo.yaml --data_folder data/demo  # DCT
    python train_CTC.py hparams/CTC/demo.yaml --data_folder data/demo --resume_from <CKPT dir>
    python train_CTC.py hparams/CTC/demo.yaml --data_folder data/demo --output_folder more \
        --resume 'results/demo/demo_CTC/3402/save/CKPT+*'      # the newest complete one

Rerunning the same command resumes from the latest checkpoint (Ctrl-C prints which, and the
command). After training, the best ``avg_checkpoints`` checkpoints by valid WER are averaged
and every ``test_csv`` is evaluated (``<output_folder>/wer_<test-set>.txt`` with every
utterance aligned, ``wer_<test-set>.json`` with its WER/CER scores for the report tools, and a
summary line in ``train_log.txt``).

A configuration with ``dynchunktrain_config_sampler`` (SpeechBrain's
``DynChunkTrainConfigRandomSampler``) trains a Conformer with Dynamic Chunk Training and
validates/tests it with the sampler's ``valid_config``/``test_config`` (its streaming WER).
"""

from __future__ import annotations

from typing import Any

import speechbrain as sb
import torch
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.decoders.ctc import CTCPrefixBeamSearcher
from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

from mamba_asr import data
from mamba_asr.brain import RECIPE_KEYS, RecipeBrain
from mamba_asr.config import cli, start_run

SEARCHES = ("greedy", "beam")
# The YAML keys this recipe reads (load_config checks a configuration has them all).
KEYS = (
    *RECIPE_KEYS,
    *data.DATA_KEYS,
    "compute_features", "normalize", "fea_augment", "speed_perturb", "ctc_cost",
    "log_softmax", "noam_annealing", "model_opt_class", "modules", "wer_computer",
    "cer_computer", "valid_search", "test_search", "ctc_beam_search", "tokenizer_file",
    "characters", "blank_index", "bos_index", "eos_index", "output_neurons",
    "test_dataloader_opts",
)


class ASR(RecipeBrain):
    """Fbank -> normalisation -> CNN front-end -> encoder -> CTC (characters)."""

    tokenizer: CTCTextEncoder
    beam_searcher: CTCPrefixBeamSearcher

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC log-probabilities (B, T', 31) and, outside training, hypotheses."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.hparams.compute_features(wavs)  # (B, T, n_mels)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            feats, wav_lens = self.hparams.fea_augment(feats, wav_lens)
        src = self.modules.CNN(feats)  # (B, T/4, channels, n_mels/4)
        # forward (not .encode) so that a DDP wrapper sees the call; tgt=None: encoder only
        enc_out = self.modules.Transformer(
            src, None, wav_lens, dynchunktrain_config=self.dynchunktrain_config(stage)
        )[0]  # (B, T/4, d_model)
        logits = self.modules.ctc_lin(enc_out)
        p_ctc = self.hparams.log_softmax(logits.float())
        hyps = None
        if stage != sb.Stage.TRAIN:
            valid = stage == sb.Stage.VALID
            search = self.hparams.valid_search if valid else self.hparams.test_search
            hyps = self._decode(p_ctc, wav_lens, search)
        return p_ctc, wav_lens, hyps

    def dynchunktrain_config(self, stage: sb.Stage) -> DynChunkTrainConfig | None:
        """Dynamic Chunk Training (optional key ``dynchunktrain_config_sampler``): a random
        chunk configuration per training batch, the sampler's fixed ``valid_config`` /
        ``test_config`` for evaluation (None: full context)."""
        sampler = getattr(self.hparams, "dynchunktrain_config_sampler", None)
        return None if sampler is None else sampler(stage)

    def _decode(self, p_ctc: torch.Tensor, wav_lens: torch.Tensor, search: str) -> list[list[str]]:
        """Word sequences by greedy CTC decoding or CTC prefix beam search."""
        if search == "beam":
            return [hyp[0].text.split() for hyp in self.beam_searcher(p_ctc, wav_lens)]
        tokens = sb.decoders.ctc_greedy_decode(p_ctc, wav_lens, blank_id=self.hparams.blank_index)
        return ["".join(self.tokenizer.decode_ndim(seq)).split() for seq in tokens]

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; WER/CER accumulated outside training."""
        p_ctc, wav_lens, hyps = predictions
        tokens, tokens_lens = batch.tokens
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            tokens = self.hparams.fea_augment.replicate_labels(tokens)
            tokens_lens = self.hparams.fea_augment.replicate_labels(tokens_lens)
        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
        if stage != sb.Stage.TRAIN:
            targets = [wrd.split() for wrd in batch.wrd]
            self.wer_metric.append(batch.id, hyps, targets)
            self.cer_metric.append(batch.id, hyps, targets)
        return loss


def add_pipelines(
    hparams: dict[str, Any], tokenizer: CTCTextEncoder, train: Any, evaluation: list[Any]
) -> None:
    """Adds ``sig`` and ``tokens`` (and keeps ``wrd``) to the datasets."""

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd: str):
        yield wrd
        yield tokenizer.encode_sequence_torch(list(wrd), allow_unk=False)

    data.add_audio_pipelines(hparams, train, evaluation)
    datasets = [d for d in [train, *evaluation] if d is not None]
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "wrd", "tokens"])


def build_brain(hparams: dict[str, Any], run_opts: Any, checkpointer: Any) -> ASR:
    """The ``ASR`` brain with its character map and (if used) beam searcher."""
    for key in ("valid_search", "test_search"):
        if hparams[key] not in SEARCHES:
            raise ValueError(f"{key} must be one of {', '.join(SEARCHES)}, not {hparams[key]!r}")
    tokenizer = data.char_encoder(
        hparams["tokenizer_file"], hparams["characters"], hparams["blank_index"],
        hparams["bos_index"], hparams["eos_index"], hparams["output_neurons"],
    )
    brain = ASR.from_hparams(hparams, run_opts, checkpointer)
    brain.tokenizer = tokenizer
    vocab = [tokenizer.ind2lab[i] for i in range(len(tokenizer))]
    brain.beam_searcher = CTCPrefixBeamSearcher(vocab_list=vocab, **hparams["ctc_beam_search"])
    return brain


def main(argv: list[str]) -> None:
    """Prepare data, train, then test the averaged best checkpoints."""
    hparams, run_opts = start_run(argv, KEYS)
    brain = build_brain(hparams, run_opts, hparams["checkpointer"])
    train, valid, tests = data.dataio_prepare(hparams, brain.tokenizer, add_pipelines)
    train_opts, valid_opts = data.loader_options(hparams, train, valid)
    brain.fit(
        hparams["epoch_counter"], train, valid,
        train_loader_kwargs=train_opts, valid_loader_kwargs=valid_opts,
    )
    brain.evaluate_test_sets(tests, hparams["test_dataloader_opts"], hparams["output_folder"])


if __name__ == "__main__":
    cli(main)
