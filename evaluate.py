#!/usr/bin/env python3
"""Evaluate a trained run (its best checkpoints averaged, or given ones) on manifests.

Usage:
    python evaluate.py hparams/CTC/demo.yaml --ckpt results/demo/demo_CTC/3402/save \
        --test_csv results/demo/demo_CTC/3402/prepared/test-clean.csv
    python evaluate.py hparams/CTC/conmamba_large.yaml --ckpt <run>/save \
        --test_csv test-clean.csv test-other.csv --data_folder /data/LibriSpeech --test_search beam
    python evaluate.py hparams/S2S/demo.yaml --ckpt <run>/save --test_csv test.csv --no_lm True
    python evaluate.py hparams/CTC/demo.yaml --ckpt <run>/save/CKPT+<A> <run>/save/CKPT+<B> ...

``--ckpt <run>/save`` (or ``<run>``) evaluates what the recipe evaluates at its test stage:
the average of the best ``avg_checkpoints`` by the recipe's key (CTC: valid WER; S2S:
``keep_best_by``). Several ``CKPT+...`` folders are averaged instead (the first also provides
the feature normaliser). The recipe is the configuration's family (``hparams/CTC`` or
``hparams/S2S``). The token map is read from the save folder (CTC ``label_encoder.txt``, S2S
``tokenizer.ckpt``); S2S decodes with the LM of ``pretrained_lm_path`` unless ``--no_lm True``.
``--data_folder`` (for ``$data_root`` manifests), ``--pretrained_lm_path``,
``--avg_checkpoints`` and ``--keep_best_by`` default to the run's values (its
``hyperparams.yaml``). Other options are YAML overrides or SpeechBrain run options
(``--device``, ``--test_search``). Audio at another sample rate than the configuration's is
resampled (one warning with the count).

Writes ``<out_dir>/wer_<csv name>.txt`` and ``.json`` (default out_dir: ``eval/`` beside the
save folder; S2S without LM: ``<out_dir>/no_lm/``, as training does, so that LM-fused results
are never overwritten) and ``<out_dir>/eval_log.txt``; prints and logs the checkpoints and the
search used, then WER and CER per manifest.
"""

from __future__ import annotations

import mamba_asr  # noqa: F401  (before speechbrain: drops its import-time torchvision notice)

# isort: split
import argparse
import logging
from pathlib import Path
from typing import Any

from speechbrain.utils.train_logger import FileTrainLogger

from mamba_asr import data
from mamba_asr.brain import RecipeBrain
from mamba_asr.config import cli
from mamba_asr.trained import RECIPES, load_trained

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("hparams_file", help="the configuration the checkpoint was trained with")
    p.add_argument(
        "--ckpt", nargs="+", action="extend", required=True,
        help="a run's save folder (its best checkpoints) or CKPT+... folder(s)",
    )
    p.add_argument("--test_csv", nargs="+", required=True, help="manifest CSV(s) to evaluate")
    p.add_argument("--out_dir", default=None, help="where wer_<name>.txt/.json go")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: the config's folder name")
    return p


def describe_search(family: str, hparams: dict[str, Any], brain: RecipeBrain) -> str:
    """The test search: CTC greedy or prefix beam search (beam size); S2S beam search (beam
    size, CTC weight) with the LM and its weight, or without LM."""
    if family == "CTC":
        if hparams["test_search"] != "beam":
            return "greedy CTC decoding"
        return f"CTC prefix beam search, beam size {hparams['ctc_beam_search']['beam_size']}"
    searcher = brain.test_searcher
    lm = (
        f"LM {hparams['pretrained_lm_path']} (lm_weight {hparams['lm_weight']})"
        if brain.lm is not None else "no LM"
    )
    return (
        f"{type(searcher).__name__}, beam size {searcher.beam_size}, ctc_weight_decode "
        f"{hparams['ctc_weight_decode']}, {lm}"
    )


def main(argv: list[str]) -> dict[str, dict[str, float]]:
    """Evaluate; returns the stats (WER, CER, loss, utterances) by manifest name."""
    args, rest = _parser().parse_known_args(argv)
    out_dir: Path | None = Path(args.out_dir) if args.out_dir else None

    def eval_logger(hparams: dict[str, Any]) -> None:
        nonlocal out_dir
        out_dir = out_dir or Path(hparams["save_folder"]).parent / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        hparams["train_logger"] = FileTrainLogger(save_file=out_dir / "eval_log.txt")

    model = load_trained(args.hparams_file, args.ckpt, rest, args.recipe, eval_logger)
    assert out_dir is not None
    recipe, hparams, brain = model.recipe, model.hparams, model.brain
    results_dir = out_dir
    if hasattr(recipe, "results_folder"):  # S2S without LM: no_lm/, as training writes
        results_dir = recipe.results_folder({**hparams, "output_folder": str(out_dir)})
    used = {
        "checkpoints": model.chosen_by,
        "search": describe_search(model.family, hparams, brain),
    }
    hparams["train_logger"].log_stats(stats_meta=used)
    for what, text in used.items():
        logger.info("%s: %s", what, text)
        print(f"{what}: {text}")

    folder = hparams["data_folder"]
    sets = {Path(csv).stem: data.evaluation_set(csv, folder) for csv in args.test_csv}
    recipe.add_pipelines(hparams, brain.tokenizer, None, list(sets.values()))
    results_dir.mkdir(parents=True, exist_ok=True)
    results = brain.evaluate_test_sets(sets, hparams["test_dataloader_opts"], results_dir)
    for name, stats in results.items():
        print(
            f"{name}: WER {stats['WER']:.2f} %, CER {stats['CER']:.2f} % "
            f"({stats['utterances']} utterances) -> {results_dir / f'wer_{name}'}.{{txt,json}}"
        )
    return results


if __name__ == "__main__":
    cli(main)
