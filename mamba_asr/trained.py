"""A trained model as the recipes left it: its configuration family, its run's configuration,
the checkpoints to average, and the recipe's brain holding their averaged weights.

Used by ``evaluate.py`` (scoring manifests) and ``export.py`` (writing a model folder):
both take either a run (its save folder: the best ``avg_checkpoints`` by the recipe's key, as
its test stage chose them) or a configuration and ``CKPT+...`` folders (averaged).

Usage:
    from mamba_asr.trained import load_trained
    model = load_trained("hparams/CTC/demo.yaml", ["results/demo/demo_CTC/3402/save"], [])
    model.brain.on_evaluate_start()   # the averaged weights in model.hparams["model"]
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import ruamel.yaml
from speechbrain.utils.checkpoints import METAFNAME, Checkpoint

from mamba_asr.brain import RecipeBrain
from mamba_asr.config import ConfigError, load_config
from mamba_asr.finetune import FINETUNE_DEFAULTS
from mamba_asr.resume import checkpoint_from_dir
from mamba_asr.unreadable_audio import MAX_SKIPPED_DEFAULT, MAX_SKIPPED_KEY

# Configuration family (the folder under hparams/) -> recipe module providing
# KEYS (the YAML keys it reads), build_brain(hparams, run_opts, checkpointer) and
# add_pipelines(hparams, tokenizer, train, sets); S2S also results_folder(hparams).
RECIPES = {"CTC": "train_CTC", "S2S": "train_S2S"}
SAVE_FOLDER = "save"
# Keys that default to the values the run was trained with (when the recipe reads them).
TRAINED_DEFAULTS = ("data_folder", "pretrained_lm_path", "avg_checkpoints", "keep_best_by")
# Keys added to the recipes after runs were trained without them -> the value such a run
# evaluates with: the fine-tuning keys only matter to training, and an old run evaluates with
# the default tolerance for unreadable audio.
LATER_KEYS: dict[str, Any] = {**FINETUNE_DEFAULTS, MAX_SKIPPED_KEY: MAX_SKIPPED_DEFAULT}


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


def relocated_overrides(run_folder: Path) -> list[str]:
    """``--key path`` for the run's paths under its ``output_folder`` (the token map, the
    manifests, ...) when the run folder has moved since training: its ``hyperparams.yaml``
    holds them resolved, under the old place. [] when it has not moved."""
    config = trained_config(run_folder / SAVE_FOLDER)
    old = config.get("output_folder")
    if not isinstance(old, str) or Path(old).resolve() == run_folder.resolve():
        return []
    overrides = []
    for key, value in config.items():
        if key == "output_folder" or not isinstance(value, str):
            continue
        if value == old or value.startswith(old.rstrip("/") + "/"):
            overrides += [f"--{key}", json.dumps(str(run_folder) + value[len(old.rstrip("/")):])]
    return [*overrides, "--output_folder", json.dumps(str(run_folder))]


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




def config_family(hparams_file: str | Path, recipe: str | None = None) -> str:
    """The recipe family ("CTC" or "S2S") of a configuration: ``recipe`` when given, else the
    folder it sits in (``hparams/CTC/...``), else (a run's ``hyperparams.yaml``) its keys: an
    attention decoder's output layer ``seq_lin`` makes it S2S, a ``ctc_lin`` alone CTC."""
    family = recipe
    if family is None:
        path = Path(hparams_file).resolve()
        family = path.parent.name
        if family not in RECIPES and path.name == "hyperparams.yaml":
            keys = trained_config(path.parent / SAVE_FOLDER)
            family = "S2S" if "seq_lin" in keys else "CTC" if "ctc_lin" in keys else family
    if family not in RECIPES:
        choices = " or ".join(RECIPES)
        raise ConfigError(f"no recipe for configurations in {family}/: pass --recipe {choices}")
    return family


@dataclass
class TrainedModel:
    """A recipe's brain built from a configuration, with the checkpoints chosen for it."""

    family: str  # "CTC" or "S2S"
    recipe: ModuleType  # train_CTC / train_S2S
    hparams_file: str
    hparams: dict[str, Any]
    brain: RecipeBrain
    save_folder: Path
    checkpoints: list[Checkpoint]  # averaged; the first also gives the normaliser
    chosen_by: str  # the checkpoints and why, for logs and model cards
    overrides: str  # the YAML overrides the configuration was loaded with

    @property
    def run_folder(self) -> Path:
        """The training run's output folder (the save folder's parent)."""
        return self.save_folder.parent

    def load_weights(self) -> None:
        """The averaged checkpoints into the brain's modules, as the recipe's test stage."""
        self.brain.on_evaluate_start()


def load_trained(
    hparams_file: str,
    ckpt: list[str],
    overrides: list[str],
    recipe: str | None = None,
    before_build: Callable[[dict[str, Any]], None] | None = None,
    no_lm: bool = False,
) -> TrainedModel:
    """The brain of ``hparams_file`` (+ ``overrides``, YAML keys or run options) for the
    checkpoints ``--ckpt`` names (:func:`checkpoint_source`); nothing is written. Keys of
    :data:`TRAINED_DEFAULTS` the command line leaves out take the run's values.
    ``before_build(hparams)`` may change the loaded hparams before the brain is built;
    ``no_lm`` builds an S2S brain without its LM (the LM file is not read)."""
    family = config_family(hparams_file, recipe)
    module = importlib.import_module(RECIPES[family])
    save_folder, ckpts = checkpoint_source(ckpt)
    rest = overrides + trained_overrides(save_folder, module.KEYS, overrides)
    if "--save_folder" not in rest:
        rest += ["--save_folder", str(save_folder)]
    # Runs older than the keys of LATER_KEYS evaluate too (with those defaults).
    keys = tuple(k for k in module.KEYS if k not in LATER_KEYS)
    _, hparams, run_opts, yaml_overrides = load_config(
        [hparams_file, *rest], keys, write_output=False
    )
    for key, default in LATER_KEYS.items():
        hparams.setdefault(key, default)
    if not Path(hparams["tokenizer_file"]).is_file():
        raise ConfigError(
            f"{hparams['tokenizer_file']} not found: the checkpoint's token map is needed "
            "(pass --tokenizer_file PATH)"
        )
    if no_lm and "no_lm" in hparams:
        hparams["no_lm"] = True
    if before_build is not None:
        before_build(hparams)
    brain = module.build_brain(hparams, run_opts, hparams["checkpointer"])
    # A run's own hyperparams.yaml names its save folder as it was when training (moved runs)
    brain.checkpointer.checkpoints_dir = save_folder
    key, higher = brain.best_key()
    chosen = best_checkpoints(brain, save_folder) if ckpts is None else ckpts
    brain.eval_checkpoints = [checkpoint_from_dir(c.path, brain.checkpointer) for c in chosen]
    chosen_by = describe_checkpoints(brain.eval_checkpoints, key)
    if ckpts is None:
        order = "highest" if higher else "lowest"
        chosen_by += f" (the best of {save_folder} by valid {key}, {order} first)"
    return TrainedModel(
        family, module, hparams_file, hparams, brain, save_folder, brain.eval_checkpoints,
        chosen_by, yaml_overrides,
    )
