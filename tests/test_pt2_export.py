"""torch.export programs of CTC models (export.py --format pt2): run by plain PyTorch in a
process without our code, parity with eager, dynamic axes, the card, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_onnx_export import eager, waveforms

import export
from mamba_asr import onnx_export
from mamba_asr.config import ConfigError
from mamba_asr.model_card import CARD_FILE, README_FILE, CardError, verify_folder
from mamba_asr.onnx_export import (
    Graph,
    OnnxExportError,
    exported_program,
    load_ctc,
    write_graph_files,
)
from mamba_asr.ort.transcriber import TOKENS_FILE

REPO = Path(__file__).resolve().parents[1]
PT2_FILES = {"features.pt2", "model.pt2", TOKENS_FILE}
# Imported by neither program: our model code, the package, SpeechBrain.
BANNED = ("modules", "mamba_asr", "speechbrain")

# Loads both programs and runs every case of an .npz: ``<graph>:<case>:<i>`` are the inputs of
# ``<graph>.pt2``, its outputs saved as ``<graph>:<case>:out<i>``, and ``<graph>:ranges`` the
# (lower, upper) sizes its first input's batch and time axes are declared for (upper -1:
# unbounded); prints the banned modules.
RUNNER = """
import sys
import numpy as np
import torch
folder, inputs, outputs = sys.argv[1:4]
programs, results = {}, {}
for name in ("features", "model"):
    program = torch.export.load(f"{folder}/{name}.pt2")
    first = program.graph_signature.user_inputs[0]
    shape = next(n for n in program.graph.nodes if n.name == first).meta["val"].shape
    ranges = [program.range_constraints[size.node.expr] for size in shape[:2]]
    results[f"{name}:ranges"] = np.array(
        [(int(r.lower), int(r.upper) if r.upper < 2**62 else -1) for r in ranges])
    programs[name] = program.module()
data = np.load(inputs)
for case in sorted({key.rsplit(":", 1)[0] for key in data.files}):
    args = [torch.from_numpy(data[f"{case}:{i}"]) for i in range(2)]
    with torch.no_grad():
        out = programs[case.split(":")[0]](*args)
    results.update({f"{case}:out{i}": t.numpy() for i, t in enumerate(out)})
np.savez(outputs, **results)
print(sorted(m for m in sys.modules if m.split(".")[0] in %r))
"""


@pytest.fixture(scope="module")
def folder(ctc_graph_export: Path) -> Path:
    """The demo CTC model (random weights) exported by export.py with its .pt2 programs
    (and the ONNX files)."""
    return ctc_graph_export


@pytest.fixture(scope="module")
def asr(folder: Path):
    return load_ctc(folder)


def padded_features(lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random features (B, max(lengths), 40), zero past each row's length."""
    frames = max(lengths)
    feats = (5 + 3 * np.random.default_rng(seed).standard_normal((len(lengths), frames, 40)))
    feats[np.arange(frames)[None, :] >= np.array(lengths)[:, None]] = 0.0
    return feats.astype(np.float32), np.array(lengths, dtype=np.int64)


@pytest.fixture(scope="module")
def inputs(asr) -> dict[str, np.ndarray]:
    """The cases: waveforms for features.pt2; for model.pt2 eager features of 1 s and 17 s,
    a padded batch of 34 s, 20 s and 1.5 s, batches of 1 and 3 at other lengths."""
    cases: dict[str, tuple[np.ndarray, np.ndarray]] = {"features:padded": waveforms([2.0, 1.234])}
    for seconds in (1, 17):
        wavs, lengths = waveforms([seconds], seed=seconds)
        with torch.no_grad():
            feats = asr.hparams.compute_features(torch.from_numpy(wavs)).numpy()
        cases[f"model:{seconds}s"] = feats, lengths // 160 + 1
    cases["model:padded"] = padded_features([3401, 2001, 151], seed=3)
    cases["model:b1"] = padded_features([57], seed=1)
    cases["model:b3"] = padded_features([411, 391, 9], seed=2)
    return {f"{case}:{i}": array for case, arrays in cases.items()
            for i, array in enumerate(arrays)}


@pytest.fixture(scope="module")
def ran(folder: Path, inputs: dict[str, np.ndarray],
        tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], list[str]]:
    """The programs run in a fresh process that could import our code (the repository is its
    working directory): their outputs and the banned modules the process imported."""
    tmp = tmp_path_factory.mktemp("pt2-run")
    np.savez(tmp / "in.npz", **inputs)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER % (BANNED,), str(folder), str(tmp / "in.npz"),
         str(tmp / "out.npz")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp / "out.npz") as out:
        return dict(out), eval(proc.stdout.strip().splitlines()[-1])  # a list of names


def test_programs_run_without_our_code(ran) -> None:
    outputs, imported = ran
    assert imported == []
    assert outputs["model:1s:out0"].shape == (1, 26, 31)


def test_features_match_speechbrain_fbank(asr, inputs: dict, ran) -> None:
    outputs, _ = ran
    feats, lengths = outputs["features:padded:out0"], outputs["features:padded:out1"]
    wavs, samples = inputs["features:padded:0"], inputs["features:padded:1"]
    assert lengths.tolist() == (samples // 160 + 1).tolist() == [201, 124]
    for row, n in enumerate(samples):
        with torch.no_grad():
            alone = asr.hparams.compute_features(torch.from_numpy(wavs[row:row + 1, :n]))[0]
        assert np.abs(feats[row, : lengths[row]] - alone.numpy()).max() <= 1e-4


@pytest.mark.parametrize("case", ["1s", "17s", "padded", "b1", "b3"])
def test_log_probs_match_eager(asr, inputs: dict, ran, case: str) -> None:
    """Each row's valid frames within 1e-4 of eager: 1 s and 17 s alone, a padded batch of
    34 s (windowed statistics), 20 s and 1.5 s, and batches of other sizes and lengths."""
    outputs, _ = ran
    feats, lengths = inputs[f"model:{case}:0"], inputs[f"model:{case}:1"]
    log_probs, out_lengths = outputs[f"model:{case}:out0"], outputs[f"model:{case}:out1"]
    ref, ref_lengths = eager(asr, torch.from_numpy(feats), torch.from_numpy(lengths))
    assert log_probs.shape == ref.shape == (len(lengths), (feats.shape[1] + 3) // 4, 31)
    assert out_lengths.tolist() == ref_lengths.tolist()
    for row, n in enumerate(out_lengths):
        assert np.abs(log_probs[row, :n] - ref[row, :n]).max() <= 1e-4


@pytest.mark.slow
def test_log_probs_match_eager_at_120_seconds(asr, folder: Path) -> None:
    """12001 frames (windowed statistics), the program loaded in this process."""
    wavs, lengths = waveforms([120], seed=120)
    with torch.no_grad():
        feats = asr.hparams.compute_features(torch.from_numpy(wavs))
        log_probs, out_lengths = torch.export.load(folder / "model.pt2").module()(
            feats, torch.from_numpy(lengths // 160 + 1))
    ref, ref_lengths = eager(asr, feats, torch.from_numpy(lengths // 160 + 1))
    assert log_probs.shape == ref.shape == (1, 3001, 31)
    assert out_lengths.tolist() == ref_lengths.tolist()
    assert np.abs(log_probs.numpy() - ref).max() <= 1e-4


def test_axes_are_dynamic(ran) -> None:
    """The saved programs declare batch and time unbounded, from 0 items and the fewest
    frames (samples) up; the cases above ran one model program at batches of 1 to 3."""
    outputs, _ = ran
    assert outputs["model:ranges"].tolist() == [[0, -1], [9, -1]]
    assert outputs["features:ranges"].tolist() == [[0, -1], [160, -1]]


class _Checked(torch.nn.Module):
    """x (B, T, 4) -> (B, 4), with runtime checks that B is not 1 and T is not 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[0] != 1)
        torch._check(x.shape[1] != 3)
        return x.cumsum(1).sum(1)


def test_program_drops_only_its_checks_that_a_size_is_not_1() -> None:
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    program = exported_program(Graph("m", _Checked(), (torch.randn(2, 5, 4),), ("x",), ("y",),
                                     ({0: batch, 1: time},))).module()
    x = torch.randn(1, 7, 4)
    assert torch.allclose(program(x), x.cumsum(1).sum(1))
    with pytest.raises(RuntimeError, match=r"Ne\(s\d+, 3\)"):
        program(torch.randn(2, 3, 4))


def test_card_lists_and_verifies_the_files(folder: Path, tmp_path: Path) -> None:
    card = verify_folder(folder)
    assert PT2_FILES | {"model.onnx", "features.onnx"} <= set(card["files"])
    assert set(card["files"]) == {p.name for p in folder.iterdir()} - {CARD_FILE}
    assert json.loads((folder / CARD_FILE).read_text())["files"] == card["files"]
    readme = (folder / README_FILE).read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in PT2_FILES)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries
    assert (folder / TOKENS_FILE).read_text(encoding="utf-8").startswith("<blk> 0\n<bos> 1\n")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "model.pt2", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CardError, match="model.pt2"):
        verify_folder(copy)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--quantize applies to the ONNX files: add --format"):
        export.main(["hparams/CTC/demo.yaml", "--ckpt", str(tmp_path), "--out",
                     str(tmp_path / "x"), "--format", "pt2", "--quantize", "int8"])
    with pytest.raises(OnnxExportError, match="pt2 export of LM models: expected a CTC or S2S"):
        onnx_export.check_request("LM", None, "pt2")
    assert [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(SystemExit):
        export._parser().parse_args(["run", "--out", "x", "--format", "torchscript"])
    args = export._parser().parse_args(["run", "--out", "x", "--format", "onnx", "pt2"])
    assert args.format == ["onnx", "pt2"]


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    """A file that fails to write removes those written before it and its own temporary."""
    def fail(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("serialiser refused")

    files = [("features.pt2", lambda path: path.write_bytes(b"whole")), ("model.pt2", fail)]
    with pytest.raises(RuntimeError, match="serialiser refused"):
        write_graph_files(tmp_path, files, "<blk> 0\n")
    assert list(tmp_path.iterdir()) == []
    assert write_graph_files(tmp_path, files[:1], "<blk> 0\n") == ["features.pt2", TOKENS_FILE]
    assert (tmp_path / TOKENS_FILE).read_text(encoding="utf-8") == "<blk> 0\n"

