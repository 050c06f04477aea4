"""SentencePiece tokenizers for the S2S recipes and the LM: trained from a manifest, or loaded.

Usage:
    python -m mamba_asr.tokenizer --csv results/prepared/train.csv --out results/tokenizer \
        --vocab_size 5000
    python -m mamba_asr.tokenizer --load results/LM/transformer/2223/export --text "HELLO WORLD"

    from mamba_asr.tokenizer import prepare_tokenizer
    sp = prepare_tokenizer("results/tokenizer", 5000, "results/prepared/train.csv")   # trains once
    sp = prepare_tokenizer("results/tokenizer", 5000, path="export/tokenizer.ckpt")   # loads

Training goes through SpeechBrain's ``SentencePiece`` wrapper with the settings of SpeechBrain's
LibriSpeech tokenizers (unigram, character coverage 1.0, ``unk`` 0 which the recipes also use
as CTC blank and padding, ``bos`` 1, ``eos`` 2, no separate pad piece). It runs on the main
process only. The wrapper reuses any ``<vocab>_<type>.model`` it finds, whatever it was trained
on; here a record ``<vocab>_<type>.json`` beside the model holds the options, a hash of the
training text and a hash of the model, and the model is reused only when all three match
(otherwise it is retrained).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from mamba_asr.atomic import atomic_open

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.ckpt"
RECORD_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded as asked."""


def read_sentences(csv_path: str | os.PathLike, column: str = "wrd") -> list[str]:
    """The non-empty, whitespace-normalised values of ``column`` in a manifest CSV."""
    path = Path(csv_path)
    if not path.is_file():
        raise TokenizerError(
            f"manifest {path} does not exist: prepare it first (e.g. python "
            "librispeech_prepare.py --data_folder <LibriSpeech> --save_folder <dir> "
            "--tr_splits train-clean-100 --merge_lst train-clean-100 --merge_name train.csv)"
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        if column not in header:
            raise TokenizerError(
                f"{path} has no column {column!r} to read sentences from "
                f"(its columns: {', '.join(header) or 'none, the file is empty'})"
            )
        index = header.index(column)
        sentences = [" ".join(row[index].split()) for row in reader if len(row) > index]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise TokenizerError(f"{path} holds no non-empty {column!r} values")
    return sentences


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    return _sha256_bytes(path.read_bytes())


def _model_prefix(model_dir: Path, vocab_size: int, model_type: str) -> Path:
    # The name SpeechBrain's wrapper gives its model: <model_dir>/<vocab>_<type>.model
    return model_dir / f"{vocab_size}_{model_type}"


def _train_on_main(model_dir: Path, csv_path: Path, column: str, options: dict) -> Path:
    """Train (or keep) the model; main process only. Returns the ``.model`` path."""
    from speechbrain.tokenizers.SentencePiece import SentencePiece

    vocab_size, model_type = options["vocab_size"], options["model_type"]
    prefix = _model_prefix(model_dir, vocab_size, model_type)
    model_path = prefix.parent / (prefix.name + ".model")
    record_path = prefix.parent / (prefix.name + ".json")
    sentences = read_sentences(csv_path, column)
    text = "\n".join(sentences) + "\n"
    wanted = {**options, "annotation_read": column, "text_sha256": _sha256_bytes(text.encode())}

    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        record = json.loads(record_path.read_text())
        if (
            record.get("version") == RECORD_VERSION
            and record.get("options") == wanted
            and model_path.is_file()
            and _sha256_file(model_path) == record.get("model_sha256")
        ):
            logger.info("tokenizer %s is up to date, not retraining it", model_path)
            return model_path
        logger.info("tokenizer %s was trained with other options or text: retraining", model_path)

    if " " in str(model_dir.resolve()):
        raise TokenizerError(
            f"cannot train a tokenizer in {model_dir}: SentencePiece's trainer flags do not "
            "accept paths with spaces; choose a model_dir without spaces"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in (record_path, model_path, prefix.parent / (prefix.name + ".vocab")):
        stale.unlink(missing_ok=True)
    text_file = prefix.parent / (prefix.name + ".txt")
    with atomic_open(text_file, "w", encoding="utf-8") as f:
        f.write(text)
    logger.info(
        "training a %d-piece %s tokenizer on %d sentences of %s",
        vocab_size,
        model_type,
        len(sentences),
        csv_path,
    )
    try:
        # The wrapper finds text_file present and trains on it directly.
        SentencePiece(
            model_dir=str(model_dir),
            vocab_size=vocab_size,
            annotation_train=str(csv_path),
            annotation_read=column,
            model_type=model_type,
            character_coverage=options["character_coverage"],
            max_sentencepiece_length=options["max_sentencepiece_length"],
            bos_id=options["bos_id"],
            eos_id=options["eos_id"],
            pad_id=options["pad_id"],
            unk_id=options["unk_id"],
            user_defined_symbols=options["user_defined_symbols"],
            text_file=str(text_file),
        )
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} tokenizer on "
            f"{len(sentences)} sentences of {csv_path}: {exc}"
        ) from exc
    finally:
        text_file.unlink(missing_ok=True)
    record = {
        "version": RECORD_VERSION,
        "options": wanted,
        "sentences": len(sentences),
        "model_sha256": _sha256_file(model_path),
    }
    with atomic_open(record_path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return model_path


def train_tokenizer(
    model_dir: str | os.PathLike,
    vocab_size: int,
    annotation_train: str | os.PathLike,
    annotation_read: str = "wrd",
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentencepiece_length: int = 10,
    bos_id: int = 1,
    eos_id: int = 2,
    unk_id: int = 0,
    pad_id: int = -1,
    user_defined_symbols: str | None = None,
) -> Path:
    """Train ``<model_dir>/<vocab_size>_<model_type>.model`` from a manifest column.

    Runs on the main process only (the others wait) and returns the model path on every
    process. A model trained earlier with the same options on the same text is kept.
    ``pad_id`` -1 (SpeechBrain's default) adds no pad piece: the recipes pad with 0 (``unk``).
    """
    from speechbrain.utils.distributed import run_on_main

    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if model_type not in ("unigram", "bpe", "char"):
        raise TokenizerError(f"model_type must be unigram, bpe or char, got {model_type!r}")
    options = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "max_sentencepiece_length": max_sentencepiece_length,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "unk_id": unk_id,
        "pad_id": pad_id,
        "user_defined_symbols": user_defined_symbols,
    }
    model_dir = Path(model_dir)
    run_on_main(_train_on_main, args=[model_dir, Path(annotation_train), annotation_read, options])
    prefix = _model_prefix(model_dir, vocab_size, model_type)
    return prefix.parent / (prefix.name + ".model")


def load_tokenizer(
    path: str | os.PathLike,
    vocab_size: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model: a ``.model``/``tokenizer.ckpt`` file or a folder holding
    ``tokenizer.ckpt``. Given ``vocab_size``/``bos_id``/``eos_id`` are checked against it."""
    from mamba_asr.pretrained import check_local_file

    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    file = check_local_file(file, "tokenizer")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(file))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{file} is not a SentencePiece model: {exc}") from exc
    found = {"vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id()}
    wanted = {"vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id}
    wrong = [
        f"{k} {found[k]} (expected {v})" for k, v in wanted.items() if v not in (None, found[k])
    ]
    if wrong:
        raise TokenizerError(
            f"tokenizer {file} does not match the config: it has {', '.join(wrong)}; point the "
            "config at the tokenizer the model was trained with, or change the config"
        )
    return sp


def prepare_tokenizer(
    model_dir: str | os.PathLike,
    vocab_size: int,
    annotation_train: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    bos_id: int = 1,
    eos_id: int = 2,
    **options: Any,
) -> spm.SentencePieceProcessor:
    """The recipes' tokenizer: loaded from ``path`` when given, else trained (once) from
    ``annotation_train`` into ``model_dir`` with :func:`train_tokenizer`'s ``options``
    (``annotation_read``, ``model_type``, ``character_coverage``, ...).

    Declared in YAML with ``!name:mamba_asr.tokenizer.prepare_tokenizer`` and called by the
    script after data preparation.
    """
    if path is None:
        if annotation_train is None:
            raise TokenizerError("give either a tokenizer path or a training manifest")
        path = train_tokenizer(
            model_dir, vocab_size, annotation_train, bos_id=bos_id, eos_id=eos_id, **options
        )
    return load_tokenizer(path, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train or inspect a SentencePiece tokenizer.")
    p.add_argument("--csv", help="training manifest (SpeechBrain CSV)")
    p.add_argument("--column", default="wrd", help="CSV column holding the text")
    p.add_argument("--out", help="model folder (the model is <vocab_size>_<type>.model)")
    p.add_argument("--vocab_size", type=int, default=5000)
    p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char"])
    p.add_argument("--load", help="load this tokenizer.ckpt/.model (or folder) instead")
    p.add_argument("--text", default="HELLO WORLD", help="sentence to encode as a check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.load:
            sp = load_tokenizer(args.load)
        elif args.csv and args.out:
            sp = prepare_tokenizer(
                args.out, args.vocab_size, args.csv,
                annotation_read=args.column, model_type=args.model_type,
            )
        else:
            p.error("give --csv and --out to train, or --load to inspect")
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ids = sp.encode_as_ids(args.text)
    print(
        f"pieces {sp.get_piece_size()}  unk {sp.unk_id()}  bos {sp.bos_id()}  "
        f"eos {sp.eos_id()}  pad {sp.pad_id()}"
    )
    print(f"{args.text!r} -> {sp.encode_as_pieces(args.text)} -> {ids} -> {sp.decode_ids(ids)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
