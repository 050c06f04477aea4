#!/usr/bin/env python3
"""S2S recipe: Conformer / ConMamba encoder, Transformer / Mamba decoder, joint CTC/attention.

Usage:
    python train_LM.py hparams/LM/transformer.yaml --data_folder /data/LibriSpeech   # LM first
    python train_S2S.py hparams/S2S/conmamba_large.yaml --data_folder /data/LibriSpeech
    python train_S2S.py hparams/S2S/conmamba_large.yaml --data_folder ... --no_lm True
    python train_S2S.py hparams/S2S/conformer_small.yaml --data_folder ... \
        --pretrained_lm_path /models/asr-transformer-transformerlm-librispeech
    python train_S2S.py hparams/S2S/demo.yaml --data_folder data/demo    # 2-core CPU demo
    python -m mamba_asr.ddp_run --nproc_per_node=2 train_S2S.py hparams/S2S/conmamba_large.yaml \
        --data_folder ...                                    # or torchrun, with the same options
    python train_S2S.py hparams/S2S/demo.yaml --data_folder data/demo --resume <CKPT dir or glob>

Training minimises ``ctc_weight`` x CTC + (1 - ``ctc_weight``) x label-smoothed NLL of the
decoder; every epoch logs the valid loss and teacher-forced token accuracy (ACC), and every
``valid_search_interval`` epochs the valid WER of a beam search without LM. Checkpoints are
kept by ``keep_best_by`` (ACC, as upstream, or WER). Rerunning the same command resumes from
the latest checkpoint. Then the best ``avg_checkpoints`` are averaged and every ``test_csv``
is decoded by joint CTC/attention beam search with Transformer-LM shallow fusion
(``lm_weight``): ``<output_folder>/wer_<test-set>.txt`` / ``.json`` (alignments / WER and CER
scores); without LM (``--no_lm True`` or ``pretrained_lm_path: null``) the same files in
``<output_folder>/no_lm/``; a summary line per set in ``train_log.txt``. A finished run only
re-evaluates, so ``--no_lm True`` on a finished run decodes it again without the LM.

Tokens: one SentencePiece model for ASR and LM: the LM folder's ``tokenizer.ckpt``, else
``pretrained_tokenizer_path``, else one trained on ``train_csv``. Its copy ``tokenizer_file``
in the save folder is what resumed runs and ``evaluate.py`` use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sentencepiece as spm
import speechbrain as sb
import torch
from speechbrain.decoders.scorer import ScorerBuilder
from speechbrain.decoders.seq2seq import S2SBeamSearcher, S2STransformerBeamSearcher
from speechbrain.utils.distributed import if_main_process, run_on_main

from mamba_asr import data
from mamba_asr.atomic import atomic_open
from mamba_asr.brain import RECIPE_KEYS, RecipeBrain
from mamba_asr.config import ConfigError, cli, start_run
from mamba_asr.pretrained import PretrainedError, check_local_file, load_pretrained, resolve_files
from mamba_asr.tokenizer import TOKENIZER_FILE, TokenizerError
from modules.beam_search import S2SMambaBeamSearcher

logger = logging.getLogger(__name__)

# Valid metric that ranks checkpoints -> whether higher is better.
KEEP_BY = {"ACC": True, "WER": False}
NO_LM_FOLDER = "no_lm"  # results decoded without LM go to <output_folder>/no_lm/
# The YAML keys this recipe reads (load_config checks a configuration has them all).
KEYS = (
    *RECIPE_KEYS,
    *data.DATA_KEYS,
    "save_folder", "compute_features", "normalize", "fea_augment", "speed_perturb",
    "Transformer", "ctc_cost", "seq_cost", "ctc_weight", "log_softmax", "noam_annealing",
    "model_opt_class", "modules", "pad_index", "bos_index", "eos_index", "output_neurons",
    "valid_search", "test_search", "valid_search_interval", "ctc_scorer", "ctc_weight_decode",
    "lm_model", "lm_scorer", "lm_weight", "no_lm", "pretrained_lm_path",
    "pretrained_tokenizer_path", "tokenizer", "tokenizer_file", "keep_best_by",
    "acc_computer", "wer_computer", "cer_computer", "test_dataloader_opts",
)


class ASR(RecipeBrain):
    """Fbank -> normalisation -> CNN front-end -> encoder -> CTC head and attention decoder."""

    tokenizer: spm.SentencePieceProcessor
    valid_searcher: S2SBeamSearcher
    test_searcher: S2SBeamSearcher
    lm: torch.nn.Module | None = None  # the fused LM; None decodes without LM

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC log-probs (B, T', V), decoder log-probs (B, L+1, V), relative
        lengths (B,) and, when this stage searches, hypotheses (lists of token ids)."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos  # (B, L+1)
        feats = self.hparams.compute_features(wavs)  # (B, T, n_mels)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            feats, wav_lens = self.hparams.fea_augment(feats, wav_lens)
            tokens_bos = self.hparams.fea_augment.replicate_labels(tokens_bos)
        src = self.modules.CNN(feats)  # (B, T/4, channels, n_mels/4)
        enc_out, dec_out = self.modules.Transformer(
            src, tokens_bos, wav_lens, pad_idx=self.hparams.pad_index
        )  # (B, T', d_model), (B, L+1, d_model)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out).float())
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(dec_out).float())
        hyps = None
        searcher = self._searcher(stage)
        if searcher is not None:
            hyps, _, _, _ = searcher(enc_out.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def _searcher(self, stage: sb.Stage) -> S2SBeamSearcher | None:
        """The beam searcher of this stage: the test one at test, the valid one every
        ``valid_search_interval`` epochs, none otherwise."""
        if stage == sb.Stage.TEST:
            return self.test_searcher
        epoch = self.hparams.epoch_counter.current
        if stage == sb.Stage.VALID and epoch % self.hparams.valid_search_interval == 0:
            return self.valid_searcher
        return None

    def compute_objectives(self, predictions, batch, stage):
        """Joint CTC/NLL loss; ACC and (when searched) WER/CER accumulated outside training."""
        p_ctc, p_seq, wav_lens, hyps = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        tokens, tokens_lens = batch.tokens
        if stage == sb.Stage.TRAIN and self.hparams.fea_augment is not None:
            replicate = self.hparams.fea_augment.replicate_labels
            tokens_eos, tokens_eos_lens = replicate(tokens_eos), replicate(tokens_eos_lens)
            tokens, tokens_lens = replicate(tokens), replicate(tokens_lens)
        loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens)
        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
        weight = self.hparams.ctc_weight
        loss = weight * loss_ctc + (1 - weight) * loss_seq
        if stage != sb.Stage.TRAIN:
            self.acc_metric.append(p_seq, tokens_eos, tokens_eos_lens)
            if hyps is not None:
                words = [self.tokenizer.decode_ids(hyp).split() for hyp in hyps]
                targets = [wrd.split() for wrd in batch.wrd]
                self.wer_metric.append(batch.id, words, targets)
                self.cer_metric.append(batch.id, words, targets)
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Fresh ACC counter outside training (WER/CER: RecipeBrain); ``no_lm/`` marks LM-free
        test lines."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            return
        self.acc_metric = self.hparams.acc_computer()
        if stage == sb.Stage.TEST and self.lm is None:
            # the train log's test line then names what wrote no_lm/wer_<name>.txt
            self.test_set_name = f"{NO_LM_FOLDER}/{self.test_set_name}"

    def eval_stats(self, stage_loss: float) -> dict[str, float]:
        """Loss and ACC; WER/CER only when the stage ran a search."""
        stats = {"loss": stage_loss, "ACC": self.acc_metric.summarize()}
        if self.wer_metric.scores:
            stats["WER"] = self.wer_metric.summarize("error_rate")
            stats["CER"] = self.cer_metric.summarize("error_rate")
        return stats

    def best_key(self) -> tuple[str, bool]:
        """Checkpoints are kept and averaged by ``keep_best_by`` (ACC: higher is better)."""
        key = self.hparams.keep_best_by
        return key, KEEP_BY[key]


# --------------------------------------------------------------------------- configuration


def lm_enabled(hparams: dict[str, Any]) -> bool:
    """Whether test decoding fuses the LM of ``pretrained_lm_path``."""
    return hparams["pretrained_lm_path"] is not None and not hparams["no_lm"]


def check_config(hparams: dict[str, Any]) -> None:
    """ConfigError for values this recipe cannot run with, and for missing LM files (before
    anything is prepared or trained)."""
    for key in ("ctc_weight", "ctc_weight_decode"):
        if not 0.0 <= hparams[key] <= 1.0:
            raise ConfigError(f"{key} must be between 0 and 1, not {hparams[key]!r}")
    if hparams["lm_weight"] < 0:
        raise ConfigError(f"lm_weight must be >= 0, not {hparams['lm_weight']!r}")
    interval = hparams["valid_search_interval"]
    if not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"valid_search_interval must be an integer >= 1, not {interval!r}")
    key = hparams["keep_best_by"]
    if key not in KEEP_BY:
        raise ConfigError(f"keep_best_by must be one of {', '.join(KEEP_BY)}, not {key!r}")
    if key == "WER" and interval != 1:
        raise ConfigError(
            "keep_best_by WER needs the valid WER of every epoch: set valid_search_interval 1"
        )
    decoder = getattr(hparams["Transformer"], "decoder_module", "transformer")
    for name in ("valid_search", "test_search"):
        searcher = getattr(hparams[name], "func", hparams[name])
        if decoder != "mamba" and issubclass(searcher, S2SMambaBeamSearcher):
            raise ConfigError(
                f"{name}: S2SMambaBeamSearcher needs decoder_module mamba (this model has a "
                "transformer decoder): use speechbrain.decoders.S2STransformerBeamSearcher"
            )
        if not issubclass(searcher, S2STransformerBeamSearcher):
            raise ConfigError(f"{name} must be an S2STransformerBeamSearcher (or subclass)")
    try:
        if lm_enabled(hparams):
            resolve_files(hparams["pretrained_lm_path"], need=("lm",))
        for path in tokenizer_sources(hparams):
            check_local_file(path, "tokenizer")
    except PretrainedError as exc:
        raise ConfigError(f"{exc} (or decode without LM: --pretrained_lm_path null)") from exc


# --------------------------------------------------------------------------- tokenizer and LM


def tokenizer_sources(hparams: dict[str, Any]) -> list[Path]:
    """Tokenizers the run must use: ``pretrained_tokenizer_path`` and the LM folder's
    ``tokenizer.ckpt`` (the latter only while the run has no tokenizer yet or fuses the LM)."""
    sources = []
    if hparams["pretrained_tokenizer_path"] is not None:
        sources.append(Path(hparams["pretrained_tokenizer_path"]))
    lm_folder = hparams["pretrained_lm_path"]
    first_run = not Path(hparams["tokenizer_file"]).is_file()
    if lm_folder is not None and (lm_enabled(hparams) or first_run):
        sources.append(Path(lm_folder) / TOKENIZER_FILE)
    return sources


def _write_run_tokenizer(path: Path, sp: spm.SentencePieceProcessor) -> None:
    with atomic_open(path, "wb") as f:
        f.write(sp.serialized_model_proto())


def prepare_run_tokenizer(hparams: dict[str, Any]) -> spm.SentencePieceProcessor:
    """The run's tokenizer (``tokenizer_file``): created once from its source (the LM
    folder's, ``pretrained_tokenizer_path``, or trained on ``train_csv``), then loaded.

    Raises ConfigError when a given source differs from it: ASR and LM share one tokenizer,
    and the checkpoints of this run were trained with ``tokenizer_file``.
    """
    run_file = Path(hparams["tokenizer_file"])
    sources = tokenizer_sources(hparams)
    try:
        if not run_file.is_file():
            sp = hparams["tokenizer"](path=sources[0] if sources else None)
            run_on_main(_write_run_tokenizer, args=[run_file, sp])
        sp = hparams["tokenizer"](path=run_file)
        for source in sources:
            other = hparams["tokenizer"](path=source)
            if other.serialized_model_proto() != sp.serialized_model_proto():
                raise ConfigError(
                    f"tokenizer {source} differs from {run_file}, the tokenizer this run was "
                    "trained with: the ASR model and the LM must share one tokenizer (use the "
                    "LM trained with it, or another output_folder)"
                )
    except (TokenizerError, PretrainedError) as exc:
        raise ConfigError(str(exc)) from exc
    return sp


def load_lm(hparams: dict[str, Any]) -> torch.nn.Module | None:
    """The LM of ``pretrained_lm_path`` (``lm_model`` loaded strictly, frozen, eval mode), or
    None without LM fusion."""
    if not lm_enabled(hparams):
        return None
    lm = hparams["lm_model"]()
    try:
        load_pretrained(lm_model=lm, source=hparams["pretrained_lm_path"])
    except PretrainedError as exc:
        raise ConfigError(str(exc)) from exc
    return lm.eval().requires_grad_(False)


def build_searcher(
    hparams: dict[str, Any], name: str, lm: torch.nn.Module | None = None
) -> S2SBeamSearcher:
    """``hparams[name]`` (valid_search/test_search) with the CTC prefix scorer
    (``ctc_weight_decode``) and, given ``lm``, the LM scorer (``lm_weight``)."""
    scorers, weights = [], {}
    if hparams["ctc_weight_decode"] > 0:
        scorers.append(hparams["ctc_scorer"])
        weights["ctc"] = hparams["ctc_weight_decode"]
    if lm is not None:
        scorers.append(hparams["lm_scorer"](language_model=lm))
        weights["transformerlm"] = hparams["lm_weight"]
    scorer = ScorerBuilder(full_scorers=scorers, weights=weights) if scorers else None
    return hparams[name](scorer=scorer)


# --------------------------------------------------------------------------- data


def add_pipelines(
    hparams: dict[str, Any], tokenizer: spm.SentencePieceProcessor, train: Any, evaluation: list
) -> None:
    """Adds ``sig``, ``wrd``, ``tokens_bos`` [bos, t..], ``tokens_eos`` [t.., eos] and
    ``tokens`` [t..] to the datasets (``train`` None: evaluation sets only)."""
    bos, eos = hparams["bos_index"], hparams["eos_index"]

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens_bos", "tokens_eos", "tokens")
    def text_pipeline(wrd: str):
        yield wrd
        ids = tokenizer.encode_as_ids(wrd)
        yield torch.LongTensor([bos, *ids])
        yield torch.LongTensor([*ids, eos])
        yield torch.LongTensor(ids)

    data.add_audio_pipelines(hparams, train, evaluation)
    datasets = [d for d in [train, *evaluation] if d is not None]
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    keys = ["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens"]
    sb.dataio.dataset.set_output_keys(datasets, keys)


# --------------------------------------------------------------------------- main


def build_brain(hparams: dict[str, Any], run_opts: Any, checkpointer: Any) -> ASR:
    """The ``ASR`` brain with its tokenizer, LM (or none) and beam searchers."""
    check_config(hparams)
    tokenizer = prepare_run_tokenizer(hparams)
    lm = load_lm(hparams)
    brain = ASR.from_hparams(hparams, run_opts, checkpointer)
    brain.tokenizer = tokenizer
    if lm is not None:
        brain.lm = lm.to(brain.device)
    brain.valid_searcher = build_searcher(hparams, "valid_search")
    brain.test_searcher = build_searcher(hparams, "test_search", brain.lm)
    return brain


def results_folder(hparams: dict[str, Any]) -> Path:
    """Where ``wer_<test-set>.txt`` goes: ``output_folder``, or its ``no_lm/`` without LM."""
    out = Path(hparams["output_folder"])
    return out if lm_enabled(hparams) else out / NO_LM_FOLDER


def main(argv: list[str]) -> None:
    """Prepare data and tokenizer, train, then test the averaged best checkpoints."""
    # check_config: fail on LM files and values before preparing anything
    hparams, run_opts = start_run(argv, KEYS, check_config)
    brain = build_brain(hparams, run_opts, hparams["checkpointer"])
    train, valid, tests = data.dataio_prepare(hparams, brain.tokenizer, add_pipelines)
    train_opts, valid_opts = data.loader_options(hparams, train, valid)
    brain.fit(
        hparams["epoch_counter"], train, valid,
        train_loader_kwargs=train_opts, valid_loader_kwargs=valid_opts,
    )
    out_dir = results_folder(hparams)
    if if_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    brain.evaluate_test_sets(tests, hparams["test_dataloader_opts"], out_dir)


if __name__ == "__main__":
    cli(main)
