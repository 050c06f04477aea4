"""Short training runs shared by the test modules that read them (session fixtures,
registered in conftest): a CTC demo run (evaluate.py, export) and an S2S demo run with a tiny
LM, killed inside its second checkpoint save and finished by the same command (the S2S recipe
tests, evaluate.py, export)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from filelock import FileLock

# The project's modules are imported in the fixtures: scripts the tests run with only tests/ on
# their path (record_ops.py) import conftest, and so this module, too.

REPO = Path(__file__).resolve().parents[1]
CTC_DEMO = REPO / "hparams" / "CTC" / "demo.yaml"
S2S_DEMO = REPO / "hparams" / "S2S" / "demo.yaml"
# CTC: 2 epochs on the first 64 training utterances; 16 test-clean utterances evaluated.
CTC_SELECT = "[64, 8, 16, 8]"
CTC_N_TEST = 16
# S2S: 2 epochs on the first 64 training and 10 dev/test utterances of each split, a 1-layer
# encoder and decoder, small beams.
S2S_SELECT = "[64, 10, 10, 10]"
S2S_N_TEST = 10
S2S_TINY = [
    "--num_encoder_layers", "1", "--num_decoder_layers", "1", "--d_ffn", "256",
    "--valid_beam_size", "2", "--test_beam_size", "3", "--valid_search_interval", "2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
T = TypeVar("T")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], T]) -> T:
    """``build(folder)`` once per test session, in a new folder. Under pytest-xdist (``make
    test`` runs the suite in one worker process per core) every worker would build its own
    session fixtures: there the first worker that asks builds it in the folder the workers
    share, holding a file lock, and the others wait and take its pickled result."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / "shared"  # the session's, not the worker's
    shared.mkdir(exist_ok=True)
    folder, result = shared / name, shared / f"{name}.pickle"
    with FileLock(shared / f"{name}.lock"):
        if result.exists():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
        folder.mkdir()
        value = build(folder)
        result.write_bytes(pickle.dumps(value))
        return value


def load_s2s_demo(**overrides: object) -> dict:
    """hparams/S2S/demo.yaml loaded with ``overrides``."""
    from hyperpyyaml import load_hyperpyyaml

    with open(S2S_DEMO, encoding="utf-8") as f:
        return load_hyperpyyaml(f, overrides)


def ckpt_metas(out: Path) -> list[dict]:
    """The CKPT.yaml of every checkpoint of a run folder."""
    return [yaml.safe_load((d / "CKPT.yaml").read_text()) for d in (out / "save").glob("CKPT+*")]


def _train_ctc(corpus: Path, out: Path, *options: str) -> Path:
    """``train_CTC.py`` on the CTC demo configuration into ``out`` with ``options``."""
    cmd = [sys.executable, "train_CTC.py", str(CTC_DEMO), "--data_folder", str(corpus),
           "--output_folder", str(out), "--noprogressbar", *options]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def ctc_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of the CTC demo configuration on a slice of the demo corpus."""
    return built_once(tmp_path_factory, "ctc", lambda folder: _train_ctc(
        demo_corpus, folder / "run", "--select_n_sentences", CTC_SELECT,
        "--number_of_epochs", "2"))


@pytest.fixture(scope="session")
def s2s_manifests(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus' training manifest (all 3,040 utterances) in a temporary folder."""

    def build(folder: Path) -> Path:
        from mamba_asr import data

        data.prepare_manifests({
            "data_folder": str(demo_corpus), "prep_folder": str(folder),
            "train_splits": ["train-clean-100"], "dev_splits": [], "test_splits": [],
            "select_n_sentences": None, "skip_prep": False,
        })
        return folder

    return built_once(tmp_path_factory, "s2s_prep", build)


@pytest.fixture(scope="session")
def s2s_lm_folder(s2s_manifests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random TransformerLM in the demo configuration's LM architecture and a tokenizer
    trained on the demo transcripts, exported as train_LM.py does."""

    def build(folder: Path) -> Path:
        import torch

        from mamba_asr.pretrained import write_lm_folder
        from mamba_asr.tokenizer import prepare_tokenizer

        tokenizer = prepare_tokenizer(folder / "spm", 256, s2s_manifests / "train.csv")
        lm_model = load_s2s_demo(data_folder=str(folder), output_folder=str(folder))["lm_model"]
        torch.manual_seed(0)
        return write_lm_folder(folder / "export", lm_model(), tokenizer,
                               dict(lm_model.keywords))

    return built_once(tmp_path_factory, "s2s_lm", build)


@pytest.fixture(scope="session")
def s2s_run(
    demo_corpus: Path, s2s_lm_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Killed inside its second checkpoint save, then the same command finishes it."""

    def build(folder: Path) -> dict:
        from conftest import logged_epochs

        from mamba_asr.checkpoints import KILL_ENV

        out = folder / "run"
        args = [
            str(S2S_DEMO), "--data_folder", str(demo_corpus), "--output_folder", str(out),
            "--select_n_sentences", S2S_SELECT, "--number_of_epochs", "2",
            "--pretrained_lm_path", str(s2s_lm_folder), "--noprogressbar", *S2S_TINY,
        ]
        cmd = [sys.executable, "train_S2S.py", *args]
        killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                env={**ENV, KILL_ENV: "2:1"}, timeout=600)
        after_kill = {"returncode": killed.returncode,
                      "epochs": logged_epochs(out / "train_log.txt"),
                      "ckpt_epochs": [m["epoch"] for m in ckpt_metas(out)]}
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return {"out": out, "args": args, "after_kill": after_kill, "lm": s2s_lm_folder}

    return built_once(tmp_path_factory, "s2s", build)


def _export(run: Path, out: Path, *options: str) -> Path:
    """``export.py run --out out *options``."""
    cmd = [sys.executable, "export.py", str(run), "--out", str(out), *options]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def ctc_random_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CTC demo configuration's run with a zero learning rate: its checkpoint holds the
    random initial weights, whose transcripts are long strings of characters (a trained short
    run only emits blanks), so comparing them tests every step of a pipeline; its test stage
    runs one utterance per batch (no padding)."""
    return built_once(tmp_path_factory, "ctc_random", lambda folder: _train_ctc(
        demo_corpus, folder / "run", "--select_n_sentences", "[16, 8, 16, 8]",
        "--number_of_epochs", "1", "--lr_model", "0.0", "--test_dataloader_opts",
        "{batch_size: 1}"))


@pytest.fixture(scope="session")
def ctc_export(ctc_random_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight CTC demo run exported by export.py."""
    return built_once(tmp_path_factory, "export",
                      lambda folder: _export(ctc_random_run, folder / "demo-ctc"))


@pytest.fixture(scope="session")
def ctc_graph_export(ctc_random_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight CTC demo run exported by export.py with every graph format:
    --format onnx pt2 --quantize int8."""
    return built_once(tmp_path_factory, "graph-export",
                      lambda folder: _export(ctc_random_run, folder / "demo-ctc", "--format",
                                             "onnx", "pt2", "--quantize", "int8"))
