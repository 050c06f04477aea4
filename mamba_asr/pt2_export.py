"""``torch.export`` programs of a model folder: the ONNX export's graphs as ``.pt2`` files.

Files added to an export folder (``export.py --format pt2``, or :func:`export_pt2` on a folder
``export.py`` wrote), one per graph of :func:`mamba_asr.onnx_export.load_graphs`::

    features.pt2   waveform (batch, samples), waveform_lengths (batch,) -> features,
                   feature_lengths: as features.onnx
    model.pt2      features (batch, frames, n_mels), feature_lengths (batch,) -> log_probs
                   (batch, out_frames, vocab), log_prob_lengths (batch,): as model.onnx
    tokens.txt     as the ONNX export's
    encoder.pt2, decoder_init.pt2, decoder_step.pt2, lm.pt2
                   S2S models: as their .onnx files (:mod:`mamba_asr.onnx_s2s`)

Each is an ``ExportedProgram`` written by ``torch.export.save``, weights inside, batch and
time dynamic: the PyTorch-native replacement of TorchScript files. Plain PyTorch runs it,
without this repository or SpeechBrain (the selective scan is torch's ``scan`` operator)::

    model = torch.export.load("model.pt2").module()
    log_probs, lengths = model(features, feature_lengths)

Usage:
    from mamba_asr.pt2_export import export_pt2
    export_pt2("models/demo-ctc")
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mamba_asr.onnx_export import (
    add_to_folder,
    check_request,
    exported_program,
    load_graphs,
    write_graph_files,
)

SUFFIX = ".pt2"
FORMAT = "pt2"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The serialiser's notices that say nothing about this export kept off the command's
    output: the scan operator's empty list of extra inputs, buffers sharing no storage."""
    logger = logging.getLogger("torch._export.serde.serialize")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No complete tensor found")
            yield
    finally:
        logger.setLevel(level)


def _save(program: torch.export.ExportedProgram, path: Path) -> None:
    """``program`` saved at ``path`` (given as a file: the temporary's name has no ``.pt2``
    suffix, which the saver warns about)."""
    with _quiet(), open(path, "wb") as f:
        torch.export.save(program, f)


def write_pt2_files(folder: Path, family: str) -> list[str]:
    """Writes the ``.pt2`` programs and tokens.txt into the export folder ``folder`` (its card
    untouched); returns their names. Every program is traced before any file is written;
    each file appears whole or not at all, and none unless all were written."""
    check_request(family, None, FORMAT)
    graphs, tokens = load_graphs(folder, family)
    files = [(g.name + SUFFIX, functools.partial(_save, exported_program(g))) for g in graphs]
    return write_graph_files(folder, files, tokens)


def export_pt2(folder: str | os.PathLike) -> dict[str, Any]:
    """Adds the ``.pt2`` programs to the export folder ``folder`` (checksums verified first)
    and to its model card and README; returns the card."""
    return add_to_folder(folder, write_pt2_files)
