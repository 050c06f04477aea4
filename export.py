#!/usr/bin/env python3
"""Export a trained model to a self-contained folder (SpeechBrain's inference format).

Usage:
    python export.py results/demo/demo_CTC/3402 --out models/demo-ctc          # a run folder
    python export.py hparams/S2S/demo.yaml --ckpt <run>/save/CKPT+<A> <run>/save/CKPT+<B> \
        --out models/demo-s2s                                  # a configuration + checkpoints
    python export.py results/demo/demo_S2S/7775 --out models/demo-s2s-nolm --no_lm
    python export.py results/demo/demo_CTC/3402 --out models/demo-ctc --format onnx \
        --quantize int8                              # + features/model/model.int8.onnx, tokens.txt

A run folder gives the average of its best ``avg_checkpoints`` (as its test stage); a
configuration with ``--ckpt`` folders averages those (or ``--ckpt <run>/save``: its best), as
``evaluate.py`` does. The folder holds ``hyperparams.yaml`` (inference only), ``asr.ckpt``,
``normalizer.ckpt``, ``tokenizer.ckpt``, ``lm.ckpt`` (S2S with LM, unless ``--no_lm``),
``model_card.json`` and ``README.md``; it is written to a temporary sibling and renamed into
place. Load it with ``transcribe.py <folder> audio.flac`` or SpeechBrain's
``EncoderASR``/``EncoderDecoderASR.from_hparams(source=<folder>, savedir=<folder>)``.
``--format onnx`` adds ``features.onnx``, ``model.onnx``, ``tokens.txt`` and, with
``--quantize int8``, ``model.int8.onnx`` for onnxruntime (``mamba_asr.onnx_export``); S2S
models ``encoder.onnx``, the decoder's ``decoder_init.onnx``/``decoder_step.onnx`` and the
LM's ``lm.onnx`` instead of ``model.onnx`` (``mamba_asr.onnx_s2s``). ``--format pt2`` writes
the same graphs as ``torch.export`` programs (``features.pt2``, ``model.pt2``, ...;
``mamba_asr.pt2_export``); ``--format onnx pt2`` both.
Other options are YAML overrides of the configuration (e.g. ``--data_folder``).
"""

from __future__ import annotations

import mamba_asr  # noqa: F401  (before speechbrain: drops its import-time torchvision notice)

# isort: split
import argparse
from pathlib import Path

from mamba_asr.config import ConfigError, cli
from mamba_asr.export import check_formats, export_model
from mamba_asr.onnx_export import QUANTIZE
from mamba_asr.trained import (
    RECIPES,
    SAVE_FOLDER,
    config_family,
    load_trained,
    relocated_overrides,
)

RUN_CONFIG = "hyperparams.yaml"
FORMATS = ("speechbrain", "onnx", "pt2")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("source", help="a run's output folder, or the configuration it was trained with")
    p.add_argument("--ckpt", nargs="+", action="extend",
                   help="with a configuration: a save folder or CKPT+... folder(s)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--no_lm", nargs="?", const="True", default="False",
                   help="leave the LM of an S2S model out (also --no_lm True)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--name", help="the model's name in its card (default: the folder's)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default: from the configuration")
    p.add_argument("--format", choices=FORMATS, nargs="+", default=[FORMATS[0]],
                   help="speechbrain: the SpeechBrain folder (always written); onnx: and the "
                        "ONNX files; pt2: and the same graphs as torch.export "
                        "programs; several at once: --format onnx pt2")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="with --format onnx: also model.int8.onnx (S2S: encoder, decoder_step), "
                        "the weights quantised")
    return p


def source_arguments(
    source: str, ckpt: list[str] | None
) -> tuple[str, list[str], list[str]]:
    """``(configuration, --ckpt folders, overrides)`` for a run folder (its paths relocated
    if it moved since training) or a configuration + --ckpt."""
    path = Path(source)
    if path.is_dir():
        if ckpt:
            raise ConfigError(f"--ckpt is for a configuration; {source} is a run folder")
        if not (path / RUN_CONFIG).is_file() or not (path / SAVE_FOLDER).is_dir():
            raise ConfigError(
                f"{source} is not a run folder (expected {RUN_CONFIG} and {SAVE_FOLDER}/ "
                "written by train_CTC.py or train_S2S.py)"
            )
        return str(path / RUN_CONFIG), [str(path / SAVE_FOLDER)], relocated_overrides(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such run folder or configuration file")
    if not ckpt:
        raise ConfigError(f"{source} is a configuration: name its checkpoints with --ckpt")
    return source, ckpt, []


def main(argv: list[str]) -> dict:
    """Export; returns the model card."""
    args, rest = _parser().parse_known_args(argv)
    no_lm = args.no_lm.lower()
    if no_lm not in ("true", "false"):
        raise ConfigError(f"--no_lm takes True or False, not {args.no_lm!r}")
    onnx, pt2 = "onnx" in args.format, "pt2" in args.format
    config, ckpt, relocated = source_arguments(args.source, args.ckpt)
    if onnx or pt2 or args.quantize:  # refused before the model loads
        check_formats(config_family(config, args.recipe), onnx, pt2, args.quantize)
    model = load_trained(config, ckpt, [*relocated, *rest], args.recipe, no_lm=no_lm == "true")
    card = export_model(model, args.out, no_lm=no_lm == "true", overwrite=args.overwrite,
                        name=args.name, onnx=onnx, quantize=args.quantize, pt2=pt2)
    print(f"checkpoints: {card['checkpoints']}")
    print(f"{args.out}: {card['architecture']}, {card['parameters']:,} parameters; "
          f"{', '.join(card['files'])}")
    return card


if __name__ == "__main__":
    cli(main)
