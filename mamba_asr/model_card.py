"""The model card of an exported model folder: what the model is, how it was made and scored,
and the sha256 of every file, which loading checks.

A folder written by ``export.py`` holds ``model_card.json`` (read by :func:`read_card`, one
object, :data:`CARD_VERSION`) and its human-readable ``README.md``. :func:`verify_folder`
refuses a folder whose files changed since the export, naming the file.

Usage:
    card = verify_folder("models/demo-ctc")      # CardError if a file changed or is missing
    print(card["architecture"], card["parameters"])
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mamba_asr.atomic import atomic_open

CARD_FILE = "model_card.json"
README_FILE = "README.md"
CARD_VERSION = 1
_CHUNK = 1 << 20


class CardError(ValueError):
    """A model folder is not an export, or its files are not the ones exported."""


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``names`` in ``folder``."""
    return {name: sha256_file(folder / name) for name in sorted(names)}


def write_card(folder: Path, card: dict[str, Any], files: list[str], name: str) -> None:
    """Writes README.md (the model called ``name``) and model_card.json into ``folder``, each
    atomically; ``card["files"]`` becomes the sha256 of ``files`` and of the README."""
    card["files"] = file_checksums(folder, [f for f in files if f not in (CARD_FILE, README_FILE)])
    with atomic_open(folder / README_FILE, "w", encoding="utf-8") as f:
        f.write(render_readme({**card, "name": name}))
    card["files"][README_FILE] = sha256_file(folder / README_FILE)
    with atomic_open(folder / CARD_FILE, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)
        f.write("\n")


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """The model card of an export folder; CardError when there is none or it is unreadable."""
    path = Path(folder) / CARD_FILE
    if not Path(folder).is_dir():
        raise CardError(f"{folder}: no such model folder")
    if not path.is_file():
        raise CardError(
            f"{folder} is not an exported model folder (no {CARD_FILE}): export a run with "
            "`python export.py <run folder> --out <folder>`"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{path}: not a readable model card ({exc})") from exc
    if not isinstance(card, dict) or not isinstance(card.get("files"), dict):
        raise CardError(f"{path}: not a model card (expected an object with 'files')")
    if card.get("version") != CARD_VERSION:
        raise CardError(
            f"{path}: card version {card.get('version')!r}, this code reads version "
            f"{CARD_VERSION}: export the model again"
        )
    return card


def verify_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """The card of ``folder`` after checking every file it lists against its sha256;
    CardError naming the first missing or changed file."""
    root = Path(folder)
    card = read_card(root)
    for name, expected in sorted(card["files"].items()):
        path = root / name
        if not path.is_file():
            raise CardError(f"{path}: missing (the model card lists it): export the model again")
        if sha256_file(path) != expected:
            raise CardError(
                f"{path}: changed since export (its sha256 is not the one in {CARD_FILE}); "
                "restore the file or export the model again"
            )
    return card


def render_readme(card: dict[str, Any]) -> str:
    """The folder's README.md: the card for people, with the commands that use the model."""
    name = card["name"]
    lines = [
        f"# {name}",
        "",
        f"{card['architecture']}, {card['parameters']:,} parameters"
        + (f" (+ LM {card['lm_parameters']:,})" if card.get("lm_parameters") else "")
        + f". Exported by Mamba-ASR on {card['created']} from `{card['source']}`.",
        "",
        "## Use",
        "",
        "```bash",
        f"python transcribe.py {name} audio.flac --output_format all --output_dir out/",
        "```",
        "",
        "```python",
        f"from speechbrain.inference.ASR import {card['speechbrain_class']}",
        f'asr = {card["speechbrain_class"]}.from_hparams(source="{name}", savedir="{name}")',
        'print(asr.transcribe_file("audio.flac"))',
        "```",
        "",
        "## Training data",
        "",
    ]
    data = card["training_data"]
    splits = ", ".join(data["splits"]) or "unknown"
    if data.get("utterances") is not None:
        lines.append(f"{splits}: {data['utterances']:,} utterances, {data['hours']:.2f} h.")
    else:
        lines.append(f"{splits} (its manifest was not found at export).")
    lines += ["", "## Test results", ""]
    if card["test_results"]:
        lines += ["| test set | search | WER % | CER % | utterances |", "|---|---|---|---|---|"]
        for row in card["test_results"]:
            cer = "" if row["CER"] is None else f"{row['CER']:.2f}"
            lines.append(
                f"| {row['test_set']} | {row['search']} | {row['WER']:.2f} | {cer} | "
                f"{row['utterances']} |"
            )
    else:
        lines.append("No test results were found in the run folder.")
    lines += [
        "",
        "## Provenance",
        "",
        f"- checkpoints: {card['checkpoints']}",
        f"- configuration sha256: `{card['config_sha256']}`",
        f"- code: git commit `{card['git_commit']}`",
        f"- feature normalisation: {card['normalization']}",
        "",
        "## Files (sha256, checked when loading with Mamba-ASR)",
        "",
    ]
    lines += [f"- `{f}`: `{sha}`" for f, sha in card["files"].items() if f != README_FILE]
    return "\n".join(lines) + "\n"
