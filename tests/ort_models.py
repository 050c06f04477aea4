"""A hand-made CTC model in the export folder's ONNX layout (features.onnx, model.onnx,
tokens.txt, metadata_props), for testing the onnxruntime runtime without an exported network.

Its "features" are one waveform sample per 10 ms frame; its CTC head reads a constant
level: 1.0 -> ``A``, -1.0 -> ``B``, 0.5 -> the word separator, 0 (silence) -> blank. A
waveform made of such levels spells words whose times are known to the frame. Frames past a
row's length (padding) read as ``B``, as a real model's padded frames are not blank: a runtime
that decodes padding shows it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

RATE = 16000
HOP = 160  # samples per frame
FRAME_SECONDS = HOP / RATE
SYMBOLS = ["<blk>", "▁", "A", "B"]
LEVELS = {"A": 1.0, "B": -1.0, " ": 0.5}
# logits = W [f, f^2] + c per symbol: blank 0; separator peaks at f = 0.5; A at 1; B at -1
WEIGHTS = np.array([[0.0, 40.0, 20.0, -20.0], [0.0, -40.0, 0.0, 0.0]], dtype=np.float32)
BIAS = np.array([0.0, -5.0, -10.0, -10.0], dtype=np.float32)


def _int64(name: str, values: list[int]) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _save(graph: onnx.GraphProto, path: Path, metadata: dict[str, str] | None = None) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_level_model(folder: Path, model_type: str = "conmamba_ctc") -> Path:
    """The export folder's ONNX files of the level-reading model, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    wave = helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", "samples"])
    wave_len = helper.make_tensor_value_info("waveform_lengths", TensorProto.INT64, ["batch"])
    feats = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "frames", 1])
    feat_len = helper.make_tensor_value_info("feature_lengths", TensorProto.INT64, ["batch"])
    nodes = [
        helper.make_node("Slice", ["waveform", "zero", "end", "one", "hop"], ["picked"]),
        helper.make_node("Unsqueeze", ["picked", "minus_one"], ["features"]),
        helper.make_node("Add", ["waveform_lengths", "hop_less_one"], ["rounded_up"]),
        helper.make_node("Div", ["rounded_up", "hop"], ["feature_lengths"]),
    ]
    constants = [_int64("zero", [0]), _int64("end", [2**62]), _int64("one", [1]),
                 _int64("hop", [HOP]), _int64("minus_one", [-1]),
                 _int64("hop_less_one", [HOP - 1])]
    _save(helper.make_graph(nodes, "features", [wave, wave_len], [feats, feat_len], constants),
          folder / "features.onnx")
    log_probs = helper.make_tensor_value_info("log_probs", TensorProto.FLOAT,
                                              ["batch", "frames", len(SYMBOLS)])
    out_len = helper.make_tensor_value_info("log_prob_lengths", TensorProto.INT64, ["batch"])
    nodes = [
        helper.make_node("Mul", ["features", "features"], ["squared"]),
        helper.make_node("Concat", ["features", "squared"], ["both"], axis=-1),
        helper.make_node("MatMul", ["both", "weights"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["level_logits"]),
        helper.make_node("Shape", ["features"], ["shape"]),
        helper.make_node("Gather", ["shape", "time_axis"], ["frames"]),
        helper.make_node("Range", ["zero", "frames", "one"], ["frame_index"]),
        helper.make_node("Unsqueeze", ["feature_lengths", "minus_one"], ["lengths_column"]),
        helper.make_node("Less", ["frame_index", "lengths_column"], ["valid"]),
        helper.make_node("Not", ["valid"], ["padded"]),
        helper.make_node("Cast", ["padded"], ["padded_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["padded_float", "minus_one_axis"], ["padded_column"]),
        helper.make_node("Mul", ["padded_column", "padding_logits"], ["padding_bias"]),
        helper.make_node("Add", ["level_logits", "padding_bias"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
        helper.make_node("Identity", ["feature_lengths"], ["log_prob_lengths"]),
    ]
    constants = [helper.make_tensor("weights", TensorProto.FLOAT, WEIGHTS.shape,
                                    WEIGHTS.flatten().tolist()),
                 helper.make_tensor("bias", TensorProto.FLOAT, BIAS.shape, BIAS.tolist()),
                 helper.make_tensor("padding_logits", TensorProto.FLOAT, [len(SYMBOLS)],
                                    [0.0, 0.0, 0.0, 50.0]),
                 helper.make_tensor("time_axis", TensorProto.INT64, [], [1]),
                 helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                 helper.make_tensor("one", TensorProto.INT64, [], [1]),
                 _int64("minus_one", [-1]), _int64("minus_one_axis", [-1])]
    metadata = {"model_type": model_type, "version": "1", "vocab_size": str(len(SYMBOLS)),
                "blank_id": "0", "word_separator": "▁", "subsampling_factor": "1",
                "sample_rate": str(RATE), "feature_dim": "1", "frame_shift_ms": "10",
                "output_frame_seconds": str(FRAME_SECONDS), "normalize": "global",
                "tokens": "tokens.txt"}
    _save(helper.make_graph(nodes, "model", [feats, feat_len], [log_probs, out_len], constants),
          folder / "model.onnx", metadata)
    (folder / "tokens.txt").write_text("".join(f"{s} {i}\n" for i, s in enumerate(SYMBOLS)),
                                       encoding="utf-8")
    return folder


def spell(text: str, gap_s: float = 0.1, word_s: float = 0.2,
          silence_s: float = 0.3) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """A waveform that the level model reads as ``text`` (words of A and B, each letter
    ``word_s`` long, separated by ``gap_s`` of separator level), in ``silence_s`` of silence;
    and each word's (word, start, end) in seconds."""
    pieces = [np.zeros(round(silence_s * RATE), np.float32)]
    times = []
    at = silence_s
    for i, word in enumerate(text.split()):
        if i:
            pieces.append(np.full(round(gap_s * RATE), LEVELS[" "], np.float32))
            at += gap_s
        start = at
        for j, letter in enumerate(word):
            if j and word[j - 1] == letter:  # a repeated letter needs a blank between
                pieces.append(np.zeros(2 * HOP, np.float32))
                at += 2 * FRAME_SECONDS
            pieces.append(np.full(round(word_s * RATE), LEVELS[letter], np.float32))
            at += word_s
        times.append((word, start, at))
    pieces.append(np.zeros(round(silence_s * RATE), np.float32))
    return np.concatenate(pieces), times
