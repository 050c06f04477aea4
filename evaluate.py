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
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import ruamel.yaml
from speechbrain.utils.checkpoints import METAFNAME, Checkpoint
from speechbrain.utils.train_logger import FileTrainLogger

from mamba_asr import data
from mamba_asr.brain import RecipeBrain
from mamba_asr.config import ConfigError, cli, load_config
from mamba_asr.resume import checkpoint_from_dir

logger = logging.getLogger(__name__)

# Configuration family (the folder under hparams/) -> recipe module providing
# KEYS (the YAML keys it reads), build_brain(hparams, run_opts, checkpointer) and
# add_pipelines(hparams, tokenizer, train, sets); S2S also results_folder(hparams).
RECIPES = {"CTC": "train_CTC", "S2S": "train_S2S"}
SAVE_FOLDER = "save"
# Keys that default to the values the run was trained with (when the recipe reads them).
TRAINED_DEFAULTS = ("data_folder", "pretrained_lm_path", "avg_checkpoints", "keep_best_by")


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


def checkpoint_source(folders: list[str]) -> tuple[Path, list[Checkpoint] | None]:
    """``(save folder, checkpoints)`` named by ``--ckpt``: a save folder (or the run folder
    holding ``save/``) gives checkpoints None (the best ones are chosen later); CKPT+...
    folders give themselves."""
    paths = [Path(f) for f in folders]
    if len(paths) == 1 and not (paths[0] / METAFNAME).is_file():
        folder = paths[0]
        if (folder / SAVE_FOLDER).is_dir() and not any(folder.glob("CKPT+*")):
            folder = folder / SAVE_FOLDER
        if not folder.is_dir():
            raise ConfigError(f"--ckpt {paths[0]}: no such folder (expected <run>/save)")
        return folder, None
    for path in paths:
        if not (path / METAFNAME).is_file():
            raise ConfigError(
                f"--ckpt {path} is not a CKPT+... checkpoint folder: give one save folder "
                "(<run>/save: its best checkpoints) or CKPT+... folders"
            )
    ckpts = [checkpoint_from_dir(p) for p in paths]
    return Path(ckpts[0].path).parent, ckpts


def trained_config(save_folder: Path) -> dict[str, Any]:
    """The run's configuration, ``hyperparams.yaml`` beside ``save_folder`` (written by
    SpeechBrain's ``create_experiment_directory``, references resolved), as plain YAML: the
    HyperPyYAML tags (``!new:``, ``!name:``, ...) stay tags, nothing is built; {} without
    one."""
    path = save_folder.parent / "hyperparams.yaml"
    if not path.is_file():
        return {}
    try:
        config = ruamel.yaml.YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    except ruamel.yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a YAML file ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return config


def trained_overrides(save_folder: Path, keys: tuple[str, ...], given: list[str]) -> list[str]:
    """``--key value`` for each of ``keys`` (the recipe's, among TRAINED_DEFAULTS) not on the
    command line, with the run's value (a YAML scalar, JSON-quoted so that any path reads
    back as the same string)."""
    config = trained_config(save_folder)
    overrides = []
    for key in TRAINED_DEFAULTS:
        option = f"--{key}"
        if key not in keys or any(a == option or a.startswith(f"{option}=") for a in given):
            continue
        if key not in config:
            if key == "data_folder":
                raise ConfigError(
                    f"--data_folder is required (no data_folder in a hyperparams.yaml beside "
                    f"{save_folder})"
                )
            continue
        value = config[key]
        if value is None or isinstance(value, str | int | float):
            overrides += [option, json.dumps(value)]
    return overrides


def best_checkpoints(brain: RecipeBrain, save_folder: Path) -> list[Checkpoint]:
    """:meth:`RecipeBrain.best_checkpoints`, the checkpoints the recipe averages at its test
    stage; ConfigError when there are none."""
    found = brain.best_checkpoints()
    if not found:
        key, _ = brain.best_key()
        raise ConfigError(f"{save_folder} holds no checkpoint with a valid {key} to evaluate")
    return found


def describe_checkpoints(ckpts: list[Checkpoint], key: str | None) -> str:
    """``N checkpoint(s) averaged: CKPT+... (epoch E, WER x), ...``."""
    def one(ckpt: Checkpoint) -> str:
        meta = [f"{k} {ckpt.meta[k]:.4g}" if k != "epoch" else f"epoch {ckpt.meta[k]}"
                for k in ("epoch", key) if k in ckpt.meta]
        return f"{Path(ckpt.path).name} ({', '.join(meta)})" if meta else Path(ckpt.path).name

    return f"{len(ckpts)} checkpoint(s) averaged: " + ", ".join(map(one, ckpts))


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
    family = args.recipe or Path(args.hparams_file).resolve().parent.name
    if family not in RECIPES:
        choices = " or ".join(RECIPES)
        raise ConfigError(f"no recipe for configurations in {family}/: pass --recipe {choices}")
    recipe = importlib.import_module(RECIPES[family])
    save_folder, ckpts = checkpoint_source(args.ckpt)
    rest += trained_overrides(save_folder, recipe.KEYS, rest)
    if "--save_folder" not in rest:
        rest += ["--save_folder", str(save_folder)]

    _, hparams, run_opts, _ = load_config(
        [args.hparams_file, *rest], recipe.KEYS, write_output=False
    )
    if not Path(hparams["tokenizer_file"]).is_file():
        raise ConfigError(
            f"{hparams['tokenizer_file']} not found: the checkpoint's token map is needed "
            "(pass --tokenizer_file PATH)"
        )
    out_dir = Path(args.out_dir) if args.out_dir else save_folder.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    hparams["train_logger"] = FileTrainLogger(save_file=out_dir / "eval_log.txt")

    brain = recipe.build_brain(hparams, run_opts, hparams["checkpointer"])
    key, higher = brain.best_key()
    chosen = best_checkpoints(brain, save_folder) if ckpts is None else ckpts
    brain.eval_checkpoints = [checkpoint_from_dir(c.path, brain.checkpointer) for c in chosen]
    results_dir = out_dir
    if hasattr(recipe, "results_folder"):  # S2S without LM: no_lm/, as training writes
        results_dir = recipe.results_folder({**hparams, "output_folder": str(out_dir)})
    used = {
        "checkpoints": describe_checkpoints(brain.eval_checkpoints, key),
        "search": describe_search(family, hparams, brain),
    }
    if ckpts is None:
        order = "highest" if higher else "lowest"
        used["checkpoints"] += f" (the best of {save_folder} by valid {key}, {order} first)"
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
