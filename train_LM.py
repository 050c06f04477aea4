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
rerunning the same command resumes, ``--resume_from <save>/CKPT+...`` starts from a named
checkpoint once; steps whose gradients are not finite are skipped and counted
(``skipped_steps``), as in the ASR recipes (``mamba_asr.brain.TrainingBrain``). Finally the
best checkpoint is tested on every ``test_csv`` and written to ``export_folder`` as
``lm.ckpt`` + ``tokenizer.ckpt`` + ``hyperparams.yaml``: the layout of SpeechBrain's
asr-transformer-transformerlm-librispeech, so an S2S config takes that folder as its
pretrained LM/tokenizer path. The data classes are in ``mamba_asr/text_data.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import sentencepiece as spm
import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process

from mamba_asr import data, text_data
from mamba_asr.brain import TRAINING_KEYS, TrainingBrain
from mamba_asr.config import cli, start_run
from mamba_asr.pretrained import write_lm_folder

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
    *TRAINING_KEYS, *data.PREP_KEYS, *ARCH_KEYS, "save_folder", "export_folder", "seed",
    "train_csv", "valid_csv", "test_csv", "lm_corpus_files",
    "use_train_transcripts", "uppercase", "max_chars", "tokenizer", "output_neurons",
    "bos_index", "eos_index", "dynamic_batching", "dynamic_batch_sampler_train", "num_workers",
    "train_dataloader_opts", "valid_dataloader_opts", "test_dataloader_opts", "model",
    "modules", "optimizer", "compute_cost", "log_softmax", "lr_annealing", "keep_checkpoints",
)


class LM(TrainingBrain):
    """Tokens ``[bos, t1..tn]`` -> log-probabilities of ``[t1..tn, eos]``.

    Training (non-finite step skipping, resuming, epoch log, per-epoch re-shuffle of the
    bucketing sampler) is ``TrainingBrain``'s; checkpoints are ranked by valid loss.
    """

    tokenizer: spm.SentencePieceProcessor
    throughput_unit = "tokens"

    def trained_amount(self, batch) -> float:
        """Tokens in the batch (targets, ``eos`` included): the LM's throughput unit."""
        tokens_eos, tokens_lens = batch.tokens_eos
        return float(torch.round(tokens_lens * tokens_eos.shape[1]).sum())

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
        """Reset the perplexity sums."""
        super().on_stage_start(stage, epoch)
        self.nll_sum, self.n_tokens, self.n_words = 0.0, 0, 0

    def eval_stats(self, stage_loss: float) -> dict[str, float]:
        """Valid/test NLL per token (``loss``), token and word perplexity, token count."""
        loss = self.nll_sum / max(self.n_tokens, 1)
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "word ppl": math.exp(min(self.nll_sum / max(self.n_words, 1), 50.0)),
            "tokens": self.n_tokens,
        }

    def checkpoints_to_keep(self) -> int:
        """``keep_checkpoints`` best by valid loss; the best one is tested and exported."""
        return self.hparams.keep_checkpoints


def lm_arch(hparams: dict[str, Any]) -> dict[str, Any]:
    """TransformerLM keyword arguments of the YAML's model."""
    return {"vocab": hparams["output_neurons"], **{k: hparams[k] for k in ARCH_KEYS}}


def main(argv: list[str]) -> None:
    """Prepare manifests and tokenizer, train, test, export the best checkpoint."""
    hparams, run_opts = start_run(argv, KEYS)
    tokenizer = hparams["tokenizer"]()
    sets = text_data.dataio_prepare(hparams, tokenizer)

    lm_brain = LM(
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    lm_brain.tokenizer = tokenizer
    lm_brain.fit(
        lm_brain.hparams.epoch_counter,
        sets["train"],
        sets["valid"],
        train_loader_kwargs=sets["train_opts"],
        valid_loader_kwargs=sets["valid_opts"],
    )
    for name, test_set in sets["test"].items():
        lm_brain.test_set_name = name
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
