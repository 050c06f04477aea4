"""ONNX export of a model folder: graphs that onnxruntime runs without PyTorch (the CTC
graphs here; an S2S model's encoder, decoder and LM graphs: :mod:`mamba_asr.onnx_s2s`).

Files added to an export folder (``export.py --format onnx``, or :func:`export_onnx` on a
folder ``export.py`` wrote)::

    features.onnx     waveform (batch, samples) float32, waveform_lengths (batch,) int64
                      -> features (batch, frames, n_mels), feature_lengths (batch,): the
                      recipe's SpeechBrain Fbank, not normalised
    model.onnx        features, feature_lengths -> log_probs (batch, out_frames, vocab),
                      log_prob_lengths (batch,): normaliser, CNN front-end, encoder, CTC head;
                      model facts in its metadata_props (:func:`metadata`)
    model.int8.onnx   with ``quantize="int8"``: model.onnx, weights dynamically quantised to
                      int8 by onnxruntime
    tokens.txt        sherpa-onnx's ``<symbol> <id>`` per line; blank ``<blk>``, space ``▁``

Batch and time are dynamic. The features stay outside the model graph, as sherpa-onnx and
most onnxruntime front-ends compute their own; features.onnx is the exact recipe front-end for
callers without one. A feature row of a waveform of ``n`` valid samples has ``n // hop + 1``
valid frames (the frames a lone waveform gives: the STFT is centred with zero padding).

The graphs come from ``torch.onnx.export(..., dynamo=True)``. The selective scan is traced
through torch's ``scan`` operator (:mod:`modules.mamba.selective_scan_export`); the
normaliser is written here in tensor operations (SpeechBrain's and ours test values in
Python, which a graph cannot); two SpeechBrain details the exporter trips on are worked
around while tracing (:func:`_exportable`).

Usage:
    from mamba_asr.onnx_export import export_onnx
    export_onnx("models/demo-ctc", quantize="int8")
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import onnx
import sympy
import torch
from speechbrain.inference.ASR import EncoderASR
from speechbrain.lobes.models.transformer import TransformerASR as sb_transformer_asr
from speechbrain.nnet.CNN import Conv2d
from torch import Tensor, nn

from mamba_asr.atomic import atomic_path
from mamba_asr.config import ConfigError
from mamba_asr.model_card import verify_folder, write_card
from mamba_asr.ort.transcriber import (  # the file names the torch-free runtime reads
    BLANK_SYMBOL,
    FEATURES_FILE,
    MODEL_FILE,
    TOKENS_FILE,
    WORD_SEPARATOR,
)

QUANTIZE = ("int8",)
FORMAT_VERSION = "1"
# The fewest feature frames the model graph takes: the exporter specialises 4x-subsampled
# lengths of 1 and 2 frames (0.05-0.08 s); the transcriber pads clips to 0.1 s anyway.
MIN_FRAMES = 9


class OnnxExportError(ConfigError):
    """The model cannot be exported to ONNX as asked."""


# --------------------------------------------------------------------------- graphs


class FeatureGraph(nn.Module):
    """waveform (B, S), waveform_lengths (B,) -> features (B, T, n_mels), feature_lengths (B,).

    ``fbank`` is the recipe's SpeechBrain ``Fbank``; T = S // hop + 1.
    """

    def __init__(self, fbank: nn.Module) -> None:
        super().__init__()
        self.fbank = fbank
        self.hop = int(fbank.compute_STFT.hop_length)

    def forward(self, waveform: Tensor, waveform_lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.fbank(waveform), torch.div(waveform_lengths, self.hop,
                                               rounding_mode="floor") + 1


class NormalizeGraph(nn.Module):
    """features (B, T, F), feature_lengths (B,) -> normalised features (B, T, F).

    The same values as the folder's normaliser (SpeechBrain's ``InputNormalization`` or our
    ``WindowedInputNormalization``) with absolute lengths: global statistics; or each row's
    own statistics over its valid frames, at most ``window_frames`` of them centred on the
    frame (shifted to stay inside the valid frames). Sums are float64 cumulative sums, so
    every window costs the same.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        if norm.norm_type not in ("global", "sentence"):
            raise OnnxExportError(f"normalize: norm_type {norm.norm_type!r} cannot be exported "
                                  "(expected 'global' or 'sentence')")
        self.norm_type = norm.norm_type
        self.std_norm = bool(norm.std_norm)
        self.avoid_padding_norm = bool(norm.avoid_padding_norm)
        self.epsilon = float(norm.epsilon)
        self.window = getattr(norm, "window_frames", None)  # None: the whole row
        if self.norm_type == "global":
            mean, std = torch.as_tensor(norm.glob_mean), torch.as_tensor(norm.glob_std)
            self.register_buffer("mean", mean.float().reshape(1, 1, -1))
            self.register_buffer("std", std.float().reshape(1, 1, -1))

    @property
    def description(self) -> str:
        """``global``, ``sentence`` or ``windowed:<frames>``, as in the model's metadata."""
        if self.norm_type == "global":
            return "global"
        return "sentence" if self.window is None else f"windowed:{self.window}"

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        frames = x.shape[1]
        valid = torch.arange(frames, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        if self.norm_type == "global":
            mean, std = self.mean.expand_as(x), self.std.expand_as(x)
        else:
            mean, std = self._row_statistics(x, valid, lengths)
        if not self.std_norm:
            std = torch.ones_like(std)
        if self.avoid_padding_norm:
            padding = ~valid.unsqueeze(-1)
            mean = mean.masked_fill(padding, 0.0)
            std = std.masked_fill(padding, 1.0)
        return (x - mean) / std.clamp(min=self.epsilon)

    def _row_statistics(self, x: Tensor, valid: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame mean and std (B, T, F) over each frame's window of valid frames."""
        batch, frames, dim = x.shape
        count = lengths.clamp(min=1).unsqueeze(1)  # (B, 1)
        t = torch.arange(frames, device=x.device).unsqueeze(0)  # (1, T)
        if self.window is None:
            width, start = count, torch.zeros_like(t)
        else:
            width = count.clamp(max=self.window)
            start = (t - self.window // 2).clamp(min=0)
        start = torch.minimum(start, count - width).expand(batch, frames)  # (B, T)
        values = x.double() * valid.unsqueeze(-1)
        zero = values.new_zeros(batch, 1, dim)
        sums = torch.cat([zero, values.cumsum(1)], 1)  # (B, T + 1, F)
        squares = torch.cat([zero, values.square().cumsum(1)], 1)
        first = start.unsqueeze(-1).expand(batch, frames, dim)
        last = (start + width).unsqueeze(-1).expand(batch, frames, dim)
        n = width.unsqueeze(-1).double()
        mean = (sums.gather(1, last) - sums.gather(1, first)) / n
        var = (squares.gather(1, last) - squares.gather(1, first)) / n - mean.square()
        return mean.to(x.dtype), var.clamp(min=0).sqrt().to(x.dtype)


class CTCGraph(nn.Module):
    """features (B, T, n_mels), feature_lengths (B,) -> log_probs (B, T', vocab),
    log_prob_lengths (B,): the folder's normaliser, CNN front-end, encoder and CTC head.

    Output lengths as the transcriber computes them: round(length / T * T').
    """

    def __init__(self, hparams: Any) -> None:
        super().__init__()
        self.normalize = NormalizeGraph(hparams.normalize)
        self.cnn = _cnn_on_4d_input(hparams.CNN)
        self.transformer = hparams.Transformer
        self.ctc_lin = hparams.ctc_lin
        self.log_softmax = hparams.log_softmax

    def forward(self, features: Tensor, feature_lengths: Tensor) -> tuple[Tensor, Tensor]:
        _, log_probs, lengths = self.encode(features, feature_lengths)
        return log_probs, lengths

    def encode(self, features: Tensor, feature_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """encoder output (B, T', d_model), CTC log-probs (B, T', vocab), lengths (B,)."""
        relative = feature_lengths.float() / features.shape[1]
        feats = self.normalize(features, feature_lengths)
        enc = self.transformer.encode(self.cnn(feats.unsqueeze(-1)), relative)
        log_probs = self.log_softmax(self.ctc_lin(enc).float())
        lengths = torch.round(relative * log_probs.shape[1]).long()
        return enc, log_probs, lengths


def _cnn_on_4d_input(cnn: nn.Module) -> nn.Module:
    """A copy of the CNN front-end fed (B, T, F, 1) instead of (B, T, F).

    SpeechBrain's first ``Conv2d`` unsqueezes a 3-D input and squeezes dimension 1 of its
    output, which has its channels there: a no-op in PyTorch, but exported as an ONNX
    ``Squeeze`` that onnxruntime rejects. With a trailing unit axis the convolution sees
    the same 4-D tensor and nothing is squeezed.
    """
    cnn = copy.deepcopy(cnn)
    convs = [m for m in cnn.modules() if isinstance(m, Conv2d) and m.unsqueeze]
    if len(convs) > 1:
        raise OnnxExportError(f"the CNN front-end has {len(convs)} Conv2d layers taking 3-D "
                              "input; expected only its first")
    for conv in convs:
        conv.unsqueeze = False
    return cnn


def _length_to_mask(length: Tensor, max_len: int | None = None,
                    dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> Tensor:
    """SpeechBrain's ``length_to_mask`` for a known ``max_len`` without ``len(length)``, which
    fixes the batch size while tracing."""
    if max_len is None:
        raise OnnxExportError("length_to_mask needs max_len while exporting")
    mask = torch.arange(max_len, device=length.device, dtype=length.dtype) < length.unsqueeze(1)
    return mask.to(dtype=dtype or length.dtype, device=device or length.device)


@contextlib.contextmanager
def _exportable() -> Iterator[None]:
    """SpeechBrain's Transformer masks built without fixing the batch size (while tracing)."""
    with mock.patch.object(sb_transformer_asr, "length_to_mask", _length_to_mask):
        yield


@contextlib.contextmanager
def _size_oblivious() -> Iterator[None]:
    """Sizes traced as the ONNX exporter traces them: a dynamic size is not specialised for
    being 0 or 1, so the subsampled lengths' floor divisions need no guard ``torch.export``
    cannot prove for every length."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Notices that say nothing about this export kept off the command's output: the
    exporter's (torchvision's operators not registered, deprecations inside torch, axis
    renaming) and onnxruntime's quantiser's (its pre-processing advice, the boolean mask
    tensors it leaves in float)."""
    loggers = [logging.getLogger("torch.onnx._internal.exporter._registration"),
               logging.getLogger()]  # the quantiser logs to the root logger
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            # SpeechBrain's Transformer decoder and LM mix a float and a bool mask
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------- files


def tokens_text(ind2lab: dict[int, str], blank_id: int) -> str:
    """tokens.txt: ``<symbol> <id>`` for ids 0..vocab-1 (blank ``<blk>``, space ``▁``)."""
    lines = []
    for index in range(len(ind2lab)):
        if index not in ind2lab:
            raise OnnxExportError(f"the tokenizer has no label for id {index} "
                                  f"(ids 0..{len(ind2lab) - 1} expected)")
        label = BLANK_SYMBOL if index == blank_id else ind2lab[index]
        label = label.replace(" ", WORD_SEPARATOR)
        if not label or any(c.isspace() for c in label):
            raise OnnxExportError(f"token {index}: {ind2lab[index]!r} cannot be written to "
                                  f"{TOKENS_FILE} (empty or white space)")
        lines.append(f"{label} {index}\n")
    return "".join(lines)


def metadata(hparams: Any, normalize: str, vocab_size: int) -> dict[str, str]:
    """model.onnx's ``metadata_props`` (all strings, the keys sherpa-onnx-style runners read)."""
    sample_rate = int(hparams.sample_rate)
    hop = int(hparams.compute_features.compute_STFT.hop_length)
    stride = int(hparams.CNN.get_filter_properties().stride)
    encoder = getattr(hparams.Transformer, "encoder_module", "transformer")
    return {
        "model_type": f"{encoder}_ctc",
        "version": FORMAT_VERSION,
        "vocab_size": str(vocab_size),
        "blank_id": str(int(hparams.blank_index)),
        "word_separator": WORD_SEPARATOR,
        "subsampling_factor": str(stride),
        "sample_rate": str(sample_rate),
        "feature_dim": str(int(hparams.compute_features.compute_fbanks.n_mels)),
        "frame_shift_ms": f"{1000 * hop / sample_rate:g}",
        "output_frame_seconds": f"{stride * hop / sample_rate:g}",
        "normalize": normalize,
        "tokens": TOKENS_FILE,
    }


@dataclass
class Graph:
    """One graph of an export: the module and how to trace it.

    ``name`` is the file stem (``model`` -> model.onnx / model.pt2); ``dynamic`` maps each
    input to its dynamic axes (``torch.export`` ``dynamic_shapes``); ``metadata`` goes to the
    ONNX file's ``metadata_props``; ``quantize``: whether ``--quantize`` writes an int8 copy.
    """

    name: str
    module: nn.Module
    example: tuple[Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: tuple[dict[int, Any] | None, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    quantize: bool = False


def exported_program(graph: Graph) -> torch.export.ExportedProgram:
    """``graph`` traced by ``torch.export`` with its dynamic axes (eval mode, no grad), as
    the ONNX exporter traces it; it runs at every size the axes allow, 1 included."""
    with torch.no_grad(), _exportable(), _size_oblivious():
        program = torch.export.export(graph.module.eval(), graph.example,
                                      dynamic_shapes=graph.dynamic, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
    _drop_not_one_asserts(program)
    return program


def _drop_not_one_asserts(program: torch.export.ExportedProgram) -> None:
    """Removes the program's runtime checks that a dynamic size is not 1.

    Where an operator's choice depends on whether a size is 1 (a reshape of a transposed
    tensor: a view or a copy), the tracer follows the choice for sizes of 2 or more and
    asserts the size is not 1. That choice computes the same values at 1 (torch's "0/1
    specialisation" reasoning; the ONNX exporter drops every such check; the parity tests
    run single items); without this a batch of one item is refused. Other checks (e.g. the
    inputs' batch sizes agree) stay.
    """
    for module in program.graph_module.modules():  # the scan's step is a graph of its own
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in list(module.graph.nodes):
            if node.target is not torch.ops.aten._assert_scalar.default:
                continue
            condition = getattr(node.args[0], "meta", {}).get("val")
            expr = getattr(getattr(condition, "node", None), "expr", None)
            if isinstance(expr, sympy.Ne) and len(expr.free_symbols) == 1:
                (size,) = expr.free_symbols
                if sympy.solve(sympy.Eq(expr.lhs, expr.rhs), size) == [1]:
                    module.graph.erase_node(node)
        module.graph.eliminate_dead_code()
        module.recompile()


def _to_onnx(graph: Graph) -> onnx.ModelProto:
    """``graph`` as one ONNX file (weights inside) with its dynamic axes and metadata."""
    with torch.no_grad(), _exportable(), _quiet():
        program = torch.onnx.export(
            graph.module.eval(), graph.example, dynamo=True, input_names=list(graph.inputs),
            output_names=list(graph.outputs), dynamic_shapes=graph.dynamic, verbose=False,
        )
    proto = program.model_proto
    if graph.metadata:
        onnx.helper.set_model_props(proto, graph.metadata)
    return proto


def _quantize(model: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(model, out, weight_type=QuantType.QInt8)


def load_ctc(folder: str | os.PathLike) -> EncoderASR:
    """The folder's model as SpeechBrain's ``EncoderASR`` loads it, on the CPU, eval mode."""
    asr = EncoderASR.from_hparams(source=str(folder), savedir=str(folder),
                                  run_opts={"device": "cpu"})
    asr.mods.eval()
    return asr


def check_request(family: str, quantize: str | None, fmt: str = "ONNX") -> None:
    """OnnxExportError unless a ``family`` model's graphs export (to ``fmt``, as named in the
    message) with ``quantize``."""
    if family not in ("CTC", "S2S"):
        raise OnnxExportError(f"{fmt} export of {family} models: expected a CTC or S2S model")
    if quantize not in (None, *QUANTIZE):
        raise OnnxExportError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE)}")


def feature_graph(h: Any) -> Graph:
    """The features graph of a model's hyperparameters ``h`` (dynamic batch and samples)."""
    sample_rate = int(h.sample_rate)
    hop = int(h.compute_features.compute_STFT.hop_length)
    batch = torch.export.Dim("batch")
    return Graph(
        name=FEATURES_FILE.removesuffix(".onnx"), module=FeatureGraph(h.compute_features),
        example=(torch.zeros(2, 2 * sample_rate),
                 torch.tensor([2 * sample_rate, sample_rate], dtype=torch.int64)),
        inputs=("waveform", "waveform_lengths"), outputs=("features", "feature_lengths"),
        dynamic=({0: batch, 1: torch.export.Dim("samples", min=hop)}, {0: batch}),
    )


def ctc_graphs(asr: EncoderASR) -> list[Graph]:
    """features and model graphs of a CTC model (dynamic batch and time)."""
    h = asr.hparams
    sample_rate = int(h.sample_rate)
    vocab = int(h.ctc_lin.w.out_features)
    hop = int(h.compute_features.compute_STFT.hop_length)
    n_mels = int(h.compute_features.compute_fbanks.n_mels)
    batch = torch.export.Dim("batch")
    frames = torch.export.Dim("frames", min=MIN_FRAMES)
    features = feature_graph(h)
    n_frames = 2 * sample_rate // hop + 1
    model = CTCGraph(h)
    ctc = Graph(
        name=MODEL_FILE.removesuffix(".onnx"), module=model,
        example=(torch.randn(2, n_frames, n_mels),
                 torch.tensor([n_frames, n_frames // 2], dtype=torch.int64)),
        inputs=("features", "feature_lengths"), outputs=("log_probs", "log_prob_lengths"),
        dynamic=({0: batch, 1: frames}, {0: batch}),
        metadata=metadata(h, model.normalize.description, vocab), quantize=True,
    )
    return [features, ctc]


def load_graphs(folder: Path, family: str) -> tuple[list[Graph], str]:
    """The graphs of the export folder's model and its tokens.txt text."""
    if family == "S2S":
        from mamba_asr import onnx_s2s  # it builds on this module's graphs

        asr = onnx_s2s.load_s2s(folder)
        return onnx_s2s.s2s_graphs(asr), onnx_s2s.s2s_tokens(asr)
    asr = load_ctc(folder)
    h = asr.hparams
    vocab = int(h.ctc_lin.w.out_features)
    if len(asr.tokenizer.ind2lab) != vocab:
        raise OnnxExportError(f"the tokenizer has {len(asr.tokenizer.ind2lab)} labels, the CTC "
                              f"head {vocab} outputs")
    return ctc_graphs(asr), tokens_text(asr.tokenizer.ind2lab, int(h.blank_index))


def write_graph_files(folder: Path, files: list[tuple[str, Callable[[Path], Any]]],
                      tokens: str) -> list[str]:
    """Writes each ``(name, write)`` of ``files`` in order (``write(path)`` writes the file at
    ``path``), then tokens.txt (``tokens``), into ``folder``; returns their names. Each file
    appears whole or not at all, and none unless all were written."""
    files = [*files, (TOKENS_FILE, lambda path: path.write_text(tokens, encoding="utf-8"))]
    written: list[Path] = []
    try:
        for name, write in files:
            with atomic_path(folder / name) as tmp:
                write(tmp)
            written.append(folder / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return [name for name, _ in files]


def write_onnx_files(folder: Path, family: str, quantize: str | None = None) -> list[str]:
    """Writes the ONNX files into the export folder ``folder`` (its card untouched); returns
    their names (:func:`write_graph_files`)."""
    check_request(family, quantize)
    graphs, tokens = load_graphs(folder, family)
    files = [(f"{g.name}.onnx", functools.partial(onnx.save_model, _to_onnx(g))) for g in graphs]
    if quantize:
        files += [(f"{g.name}.int8.onnx", functools.partial(_quantize, folder / f"{g.name}.onnx"))
                  for g in graphs if g.quantize]
    return write_graph_files(folder, files, tokens)


def add_to_folder(folder: str | os.PathLike,
                  write: Callable[[Path, str], list[str]]) -> dict[str, Any]:
    """Adds the files ``write(folder, family)`` writes (returning their names) to the export
    folder ``folder`` (checksums verified first) and to its model card and README; returns
    the card."""
    folder = Path(folder)
    card = verify_folder(folder)
    names = write(folder, card["family"])
    write_card(folder, card, sorted({*card["files"], *names}), str(folder))
    return card


def export_onnx(folder: str | os.PathLike, quantize: str | None = None) -> dict[str, Any]:
    """Adds the ONNX files to the export folder ``folder`` and its card (:func:`add_to_folder`);
    returns the card."""
    return add_to_folder(folder, functools.partial(write_onnx_files, quantize=quantize))
