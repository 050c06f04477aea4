"""Export a trained model to a self-contained folder that SpeechBrain's inference classes load.

The folder (written atomically: built in a temporary sibling, then renamed into place)::

    hyperparams.yaml   inference only (mamba_asr.inference_yaml): EncoderASR / EncoderDecoderASR
    asr.ckpt           the averaged weights of the recipe's ``model`` (upstream's names)
    normalizer.ckpt    the feature normaliser's statistics (of the best checkpoint)
    tokenizer.ckpt     CTC: the character map; S2S: the SentencePiece model
    lm.ckpt            S2S models that fuse an LM (not with ``no_lm``)
    model_card.json    what, how trained, test results, provenance, sha256 of every file
    README.md          the card for people
    features.onnx, model.onnx, model.int8.onnx, tokens.txt
                       with ``onnx=True`` (CTC models; int8 with ``quantize="int8"``):
                       the graphs onnxruntime runs (mamba_asr.onnx_export)
    encoder.onnx, decoder_init.onnx, decoder_step.onnx, lm.onnx
                       the same for S2S models (mamba_asr.onnx_s2s)
    features.pt2, model.pt2, tokens.txt
                       with ``pt2=True``: the same graphs as ``torch.export`` programs
                       (mamba_asr.pt2_export)

Every file is named ``<pretrainer key>.ckpt``, so ``from_hparams(source=folder,
savedir=folder)`` loads them in place: nothing is linked or written into the folder.

Usage:
    from mamba_asr.export import export_model
    export_model(load_trained("<run>/hyperparams.yaml", ["<run>/save"], []), "models/x")
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hyperpyyaml import resolve_references

from mamba_asr import data, inference_yaml
from mamba_asr.atomic import atomic_open
from mamba_asr.config import ConfigError, load_config
from mamba_asr.model_card import CARD_VERSION, sha256_file, write_card
from mamba_asr.reports._common import ReportError
from mamba_asr.reports.scores import read_scores
from mamba_asr.reports.wer_table import summary_row
from mamba_asr.trained import TrainedModel, config_family

REPO = Path(__file__).resolve().parent.parent
HPARAMS_FILE = "hyperparams.yaml"
SPEECHBRAIN_CLASS = {"CTC": "EncoderASR", "S2S": "EncoderDecoderASR"}
# Statistics window of the exported normaliser for per-utterance ("sentence") configurations:
# utterances up to this long are normalised exactly as in training; longer inputs by the
# statistics of the window around each frame, whatever the file's length.
NORM_WINDOW_SECONDS = 30.0


class ExportError(ConfigError):
    """The model cannot be exported as asked."""


def check_formats(family: str, onnx: bool, pt2: bool, quantize: str | None) -> None:
    """ConfigError unless a ``family`` model exports with the ONNX files (``onnx``, quantised
    as ``quantize``) and the ``.pt2`` programs (``pt2``) as asked, before anything loads."""
    if quantize is not None and not onnx:
        raise ExportError("--quantize applies to the ONNX files: add --format onnx")
    if onnx or pt2:
        from mamba_asr.onnx_export import check_request

        if onnx:
            check_request(family, quantize)
        if pt2:
            check_request(family, None, "pt2")


def _feature_frame_seconds(hparams: dict[str, Any]) -> float:
    return hparams["compute_features"].compute_STFT.hop_length / hparams["sample_rate"]


def output_frame_seconds(hparams: dict[str, Any]) -> float:
    """Seconds per encoder output frame: the features' hop times the CNN's total stride (from
    SpeechBrain's filter analysis, as the chunked front-end reads it)."""
    return _feature_frame_seconds(hparams) * hparams["CNN"].get_filter_properties().stride


def resolved_config(model: TrainedModel) -> str:
    """The configuration the model was built from, references resolved (the run's
    ``hyperparams.yaml`` is already resolved; resolving it again changes nothing)."""
    text = Path(model.hparams_file).read_text(encoding="utf-8")
    return resolve_references(text, model.overrides).getvalue()


def git_commit() -> str | None:
    """The code's git commit (``+dirty`` with uncommitted changes), None outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def training_data(hparams: dict[str, Any]) -> dict[str, Any]:
    """The training splits and, from the run's training manifest, utterances and hours."""
    info: dict[str, Any] = {"splits": list(hparams.get("train_splits") or []),
                            "utterances": None, "hours": None}
    manifest = Path(hparams.get("train_csv") or "")
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as f:
            durations = [float(row["duration"]) for row in csv.DictReader(f)]
        info["utterances"] = len(durations)
        info["hours"] = round(sum(durations) / 3600, 3)
        limit = hparams.get("avoid_if_longer_than")
        if limit:
            info["utterances_used"] = sum(d <= limit for d in durations)
    return info


def test_results(run_folder: Path) -> list[dict[str, Any]]:
    """The run's test scores (``wer_<set>.json``; S2S also ``no_lm/``)."""
    rows = []
    for folder, search in ((run_folder, "test search"), (run_folder / "no_lm", "without LM")):
        for path in sorted(folder.glob("wer_*.json")):
            try:
                scores = read_scores(path)
            except ReportError:
                continue
            row = summary_row(scores)
            rows.append({
                "test_set": scores["test_set"], "search": search, "WER": round(row["WER"], 2),
                "CER": None if math.isnan(row["CER"]) else round(row["CER"], 2),
                "utterances": row["sentences"],
            })
    return rows


def architecture(hparams: dict[str, Any], family: str) -> str:
    """E.g. "ConMamba encoder (2 layers, d_model 144) + Mamba decoder (1 layer), CTC head"."""
    t = hparams["Transformer"]
    names = {"conmamba": "ConMamba", "conformer": "Conformer", "transformer": "Transformer",
             "mamba": "Mamba"}
    enc = getattr(t, "encoder_module", None) or hparams.get("encoder_module", "")
    text = (f"{names.get(str(enc), str(enc))} encoder ({hparams.get('num_encoder_layers')} "
            f"layers, d_model {hparams.get('d_model')})")
    if family == "S2S":
        dec = getattr(t, "decoder_module", None) or "transformer"
        text += (f" + {names.get(str(dec), str(dec))} decoder "
                 f"({hparams.get('num_decoder_layers')} layers), joint CTC/attention")
    else:
        text += ", CTC"
    return text + f" ({hparams.get('output_neurons')} output tokens)"


@contextlib.contextmanager
def _staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` renamed into place on success, removed on failure."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        stage = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
        try:
            stage.mkdir(0o777)  # the umask applies, as to the folder a plain mkdir makes
            break
        except FileExistsError:
            continue
    try:
        yield stage
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_model(
    model: TrainedModel,
    out: str | os.PathLike,
    no_lm: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    norm_window_seconds: float | None = NORM_WINDOW_SECONDS,
    onnx: bool = False,
    quantize: str | None = None,
    pt2: bool = False,
) -> dict[str, Any]:
    """Writes the export folder ``out`` for ``model`` (its averaged weights); returns the card.
    ``norm_window_seconds`` None keeps a per-utterance normaliser's statistics over the whole
    input, whatever its length (only for models used on short utterances). ``onnx`` adds the
    ONNX files, ``quantize`` ("int8") their quantised model, ``pt2`` the ``.pt2`` programs."""
    hparams = model.hparams
    with_lm = model.family == "S2S" and not no_lm and getattr(model.brain, "lm", None) is not None
    model.load_weights()

    def write_weights(stage: Path) -> None:
        torch.save(hparams["model"].state_dict(), stage / "asr.ckpt")
        shutil.copyfile(Path(model.checkpoints[0].path) / "normalizer.ckpt",
                        stage / "normalizer.ckpt")
        shutil.copyfile(hparams["tokenizer_file"], stage / "tokenizer.ckpt")
        if with_lm:
            torch.save(model.brain.lm.state_dict(), stage / "lm.ckpt")

    provenance = {
        "lm_parameters": sum(p.numel() for p in model.brain.lm.parameters()) if with_lm else None,
        "training_data": training_data(hparams),
        "test_results": test_results(model.run_folder),
        "checkpoints": model.chosen_by,
        "source": str(model.run_folder),
        "config_sha256": sha256_file(model.hparams_file),
        "config_overrides": model.overrides or "",
    }
    return write_folder(Path(out), model.family, hparams, resolved_config(model), write_weights,
                        provenance, with_lm, overwrite, name, norm_window_seconds, onnx, quantize,
                        pt2)


def export_untrained(
    hparams_file: str,
    out: str | os.PathLike,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    name: str | None = None,
    norm_window_seconds: float | None = NORM_WINDOW_SECONDS,
    onnx: bool = False,
    quantize: str | None = None,
    no_lm: bool = False,
    pt2: bool = False,
) -> dict[str, Any]:
    """Writes an export folder of a configuration's model as initialised (random weights,
    the configuration's seed): for speed and memory measurements, which do not depend on the
    weights, and for tests. Returns the card. ``onnx``, ``quantize``, ``pt2``: as
    :func:`export_model`. S2S configurations take their tokenizer from
    ``pretrained_tokenizer_path`` (an override) and fuse a random LM of their ``lm_model``
    architecture unless ``no_lm``."""
    family = config_family(hparams_file)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [hparams_file, "--data_folder", tmp, "--output_folder", tmp, *(overrides or [])]
        _, hparams, _, yaml_overrides = load_config(argv, write_output=False)
        lm = None
        if family == "S2S":
            tokenizer = hparams["pretrained_tokenizer_path"]
            if tokenizer is None:
                raise ExportError(f"{hparams_file}: an untrained S2S model needs a tokenizer: "
                                  "pass --pretrained_tokenizer_path <SentencePiece model>")
            labels = Path(tokenizer)
            hparams["tokenizer"](path=labels)  # checked: a model of output_neurons pieces
            if not no_lm:
                lm = hparams["lm_model"]()
        else:
            labels = Path(tmp) / "label_encoder.txt"
            data.char_encoder(labels, hparams["characters"], hparams["blank_index"],
                              hparams["bos_index"], hparams["eos_index"],
                              hparams["output_neurons"])

        norm = hparams["normalize"]
        if norm.norm_type == "global" and norm.count == 0:  # no statistics yet: identity
            norm.glob_mean = torch.zeros(hparams["n_mels"])
            norm.glob_std = torch.ones(hparams["n_mels"])

        def write_weights(stage: Path) -> None:
            torch.save(hparams["model"].state_dict(), stage / "asr.ckpt")
            norm._save(stage / "normalizer.ckpt")
            shutil.copyfile(labels, stage / "tokenizer.ckpt")
            if lm is not None:
                torch.save(lm.state_dict(), stage / "lm.ckpt")

        provenance = {
            "lm_parameters": None if lm is None else sum(p.numel() for p in lm.parameters()),
            "training_data": {"splits": [], "utterances": None, "hours": None},
            "test_results": [],
            "checkpoints": "none: the weights as initialised (random, the configuration's "
                           "seed), for speed and memory measurements",
            "source": hparams_file,
            "config_sha256": sha256_file(hparams_file),
            "config_overrides": yaml_overrides or "",
        }
        text = resolve_references(Path(hparams_file).read_text(encoding="utf-8"),
                                  yaml_overrides).getvalue()
        return write_folder(Path(out), family, hparams, text, write_weights, provenance,
                            lm is not None, overwrite, name, norm_window_seconds, onnx, quantize,
                            pt2)


def write_folder(
    out: Path,
    family: str,
    hparams: dict[str, Any],
    config_text: str,
    write_weights: Callable[[Path], None],
    provenance: dict[str, Any],
    with_lm: bool,
    overwrite: bool,
    name: str | None,
    norm_window_seconds: float | None,
    onnx: bool = False,
    quantize: str | None = None,
    pt2: bool = False,
) -> dict[str, Any]:
    """The folder ``out``: ``hyperparams.yaml`` from the resolved ``config_text``, the
    ``.ckpt`` files ``write_weights(stage)`` writes, with ``onnx`` the ONNX files (of the
    folder's model, ``quantize`` as :func:`mamba_asr.onnx_export.write_onnx_files`), with
    ``pt2`` the ``.pt2`` programs, the card (``provenance`` in it) and README; built in a
    temporary sibling, renamed into place."""
    check_formats(family, onnx, pt2, quantize)
    config = inference_yaml.load_resolved(config_text)
    sentence_norm = inference_yaml.uses_sentence_norm(config)
    windowed = sentence_norm and norm_window_seconds is not None
    window = round(norm_window_seconds / _feature_frame_seconds(hparams)) if windowed else None
    frame_seconds = output_frame_seconds(hparams)
    info = {
        "family": family,
        "sample_rate": hparams["sample_rate"],
        "output_frame_seconds": frame_seconds,
        "blank_index": hparams["blank_index"],
        "bos_index": hparams["bos_index"],
        "eos_index": hparams["eos_index"],
    }
    header = (
        f"# Inference configuration of {name or out.name}, exported by Mamba-ASR's export.py\n"
        f"# (its source and checksums: model_card.json). Load it with SpeechBrain:\n"
        f"# speechbrain.inference.ASR.{SPEECHBRAIN_CLASS[family]}.from_hparams("
        "source=<folder>, savedir=<folder>)\n\n"
    )
    if family == "CTC":
        text = inference_yaml.ctc_hparams(config, header, info, window)
    else:
        text = inference_yaml.s2s_hparams(config, header, info, window, with_lm)
    normalization = "global statistics of the training data (normalizer.ckpt)"
    if windowed:
        normalization = (
            f"per utterance for inputs up to {norm_window_seconds:g} s (as trained), over the "
            f"{norm_window_seconds:g} s around each frame for longer inputs"
        )
    elif sentence_norm:
        normalization = "per input (utterance or file), whatever its length"
    card = {
        "version": CARD_VERSION,
        "name": name or out.name,
        "family": family,
        "speechbrain_class": SPEECHBRAIN_CLASS[family],
        "architecture": architecture(hparams, family),
        "parameters": sum(p.numel() for p in hparams["model"].parameters()),
        "sample_rate": hparams["sample_rate"],
        "output_frame_seconds": frame_seconds,
        "normalization": normalization,
        **provenance,
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": {},
    }
    with _staged_folder(out, overwrite) as stage:
        with atomic_open(stage / HPARAMS_FILE, "w", encoding="utf-8") as f:
            f.write(text)
        write_weights(stage)
        if onnx:
            from mamba_asr.onnx_export import write_onnx_files

            write_onnx_files(stage, family, quantize)
        if pt2:
            from mamba_asr.pt2_export import write_pt2_files

            write_pt2_files(stage, family)
        write_card(stage, card, [p.name for p in stage.iterdir()], str(out))
    return card
