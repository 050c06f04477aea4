#!/usr/bin/env python3
"""Evaluate a trained checkpoint (or the average of several) on manifests, without training.

Usage:
    python evaluate.py hparams/CTC/demo.yaml \
        --ckpt results/CTC_char/demo_CTC/3402/save/CKPT+2025-01-01+10-00-00+00 \
        --test_csv results/CTC_char/demo_CTC/3402/prepared/test-clean.csv
    python evaluate.py hparams/CTC/conmamba_large.yaml --ckpt <CKPT A> <CKPT B> ... \
        --test_csv test-clean.csv test-other.csv --data_folder /data/LibriSpeech --test_search beam
    python evaluate.py hparams/S2S/demo.yaml --ckpt <CKPT> --test_csv test-clean.csv --no_lm True

Several ``--ckpt`` folders are averaged (the first, normally the best, also provides the
feature normaliser), as the training recipe does with its best ``avg_checkpoints``. The
recipe is the configuration's family (``hparams/CTC`` or ``hparams/S2S``). The token map is
read from the checkpoints' save folder (CTC ``label_encoder.txt``, S2S ``tokenizer.ckpt``); S2S
decodes with the LM of ``pretrained_lm_path`` unless ``--no_lm True``;
``--data_folder`` (for ``$data_root`` manifests) and ``--pretrained_lm_path`` default to the
values the run was trained with.
Other options are YAML overrides or SpeechBrain run options (``--device``, ``--test_search``).
Writes ``<out_dir>/wer_<csv name>.txt`` (default out_dir: ``eval/`` beside the save folder) and
``eval_log.txt`` there, and prints WER and CER per manifest.
"""

from __future__ import annotations

import mamba_asr  # noqa: F401  (before speechbrain: drops its import-time torchvision notice)

# isort: split
import argparse
import importlib
import re
from pathlib import Path

from speechbrain.utils.train_logger import FileTrainLogger

from mamba_asr import data
from mamba_asr.recipe import checkpoint_from_dir, cli, load_config

# Configuration family (the folder under hparams/) -> recipe module providing
# KEYS (the YAML keys it reads), build_brain(hparams, run_opts, checkpointer) and
# add_pipelines(hparams, tokenizer, train, sets).
RECIPES = {"CTC": "train_CTC", "S2S": "train_S2S"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("hparams_file", help="the configuration the checkpoint was trained with")
    p.add_argument("--ckpt", nargs="+", action="extend", required=True, help="CKPT+... folder(s)")
    p.add_argument("--test_csv", nargs="+", required=True, help="manifest CSV(s) to evaluate")
    p.add_argument("--out_dir", default=None, help="where wer_<name>.txt goes")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: the config's folder name")
    return p


# Keys that default to the values the run was trained with (when the recipe reads them).
TRAINED_DEFAULTS = ("data_folder", "pretrained_lm_path")


def _trained_value(save_folder: Path, key: str) -> str | None:
    """``key``'s value in the run that wrote ``save_folder`` (its ``hyperparams.yaml``)."""
    saved = save_folder.parent / "hyperparams.yaml"
    if not saved.is_file():
        return None
    match = re.search(rf"^{key}:\s*(.+?)\s*$", saved.read_text(encoding="utf-8"), re.M)
    return match.group(1).strip("'\"") if match else None


def main(argv: list[str]) -> dict[str, dict[str, float]]:
    """Evaluate; returns the stats (WER, CER, loss, utterances) by manifest name."""
    args, rest = _parser().parse_known_args(argv)
    family = args.recipe or Path(args.hparams_file).resolve().parent.name
    if family not in RECIPES:
        choices = " or ".join(RECIPES)
        raise SystemExit(f"no recipe for configurations in {family}/: pass --recipe {choices}")
    recipe = importlib.import_module(RECIPES[family])
    ckpts = [checkpoint_from_dir(d) for d in args.ckpt]
    save_folder = Path(ckpts[0].path).parent
    for key in TRAINED_DEFAULTS:
        if key not in recipe.KEYS or f"--{key}" in rest:
            continue
        trained = _trained_value(save_folder, key)
        if trained is None and key == "data_folder":
            raise SystemExit("--data_folder is required (no hyperparams.yaml beside save/)")
        if trained is not None:
            rest += [f"--{key}", trained]
    if "--save_folder" not in rest:
        rest += ["--save_folder", str(save_folder)]

    _, hparams, run_opts, _ = load_config(
        [args.hparams_file, *rest], recipe.KEYS, write_output=False
    )
    if not Path(hparams["tokenizer_file"]).is_file():
        raise SystemExit(
            f"{hparams['tokenizer_file']} not found: the checkpoint's token map is needed "
            "(pass --tokenizer_file PATH)"
        )
    out_dir = Path(args.out_dir) if args.out_dir else save_folder.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    hparams["train_logger"] = FileTrainLogger(save_file=out_dir / "eval_log.txt")

    brain = recipe.build_brain(hparams, run_opts, hparams["checkpointer"])
    brain.eval_checkpoints = [checkpoint_from_dir(c.path, brain.checkpointer) for c in ckpts]
    folder = hparams["data_folder"]
    sets = {Path(csv).stem: data.evaluation_set(csv, folder) for csv in args.test_csv}
    recipe.add_pipelines(hparams, brain.tokenizer, None, list(sets.values()))
    results = brain.evaluate_test_sets(sets, hparams["test_dataloader_opts"], out_dir)
    for name, stats in results.items():
        print(
            f"{name}: WER {stats['WER']:.2f} %, CER {stats['CER']:.2f} % "
            f"({stats['utterances']} utterances) -> {out_dir / f'wer_{name}.txt'}"
        )
    return results


if __name__ == "__main__":
    cli(main)
