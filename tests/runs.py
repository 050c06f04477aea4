"""Short training runs shared by the test modules that read them (session fixtures,
registered in conftest): a CTC demo run (evaluate.py, export) and an S2S demo run with a tiny
LM, killed inside its second checkpoint save and finished by the same command (the S2S recipe
tests, evaluate.py, export)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def load_s2s_demo(**overrides: object) -> dict:
    """hparams/S2S/demo.yaml loaded with ``overrides``."""
    from hyperpyyaml import load_hyperpyyaml

    with open(S2S_DEMO, encoding="utf-8") as f:
        return load_hyperpyyaml(f, overrides)


def ckpt_metas(out: Path) -> list[dict]:
    """The CKPT.yaml of every checkpoint of a run folder."""
    return [yaml.safe_load((d / "CKPT.yaml").read_text()) for d in (out / "save").glob("CKPT+*")]


@pytest.fixture(scope="session")
def ctc_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of the CTC demo configuration on a slice of the demo corpus."""
    out = tmp_path_factory.mktemp("ctc") / "run"
    cmd = [
        sys.executable, "train_CTC.py", str(CTC_DEMO), "--data_folder", str(demo_corpus),
        "--output_folder", str(out), "--select_n_sentences", CTC_SELECT,
        "--number_of_epochs", "2", "--noprogressbar",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def s2s_manifests(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus' training manifest (all 3,040 utterances) in a temporary folder."""
    from mamba_asr import data

    folder = tmp_path_factory.mktemp("s2s_prep")
    data.prepare_manifests({
        "data_folder": str(demo_corpus), "prep_folder": str(folder),
        "train_splits": ["train-clean-100"], "dev_splits": [], "test_splits": [],
        "select_n_sentences": None, "skip_prep": False,
    })
    return folder


@pytest.fixture(scope="session")
def s2s_lm_folder(s2s_manifests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random TransformerLM in the demo configuration's LM architecture and a tokenizer
    trained on the demo transcripts, exported as train_LM.py does."""
    import torch

    from mamba_asr.pretrained import write_lm_folder
    from mamba_asr.tokenizer import prepare_tokenizer

    folder = tmp_path_factory.mktemp("s2s_lm")
    tokenizer = prepare_tokenizer(folder / "spm", 256, s2s_manifests / "train.csv")
    lm_model = load_s2s_demo(data_folder=str(folder), output_folder=str(folder))["lm_model"]
    torch.manual_seed(0)
    return write_lm_folder(folder / "export", lm_model(), tokenizer, dict(lm_model.keywords))


@pytest.fixture(scope="session")
def s2s_run(
    demo_corpus: Path, s2s_lm_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Killed inside its second checkpoint save, then the same command finishes it."""
    from conftest import logged_epochs

    from mamba_asr.checkpoints import KILL_ENV

    out = tmp_path_factory.mktemp("s2s") / "run"
    args = [
        str(S2S_DEMO), "--data_folder", str(demo_corpus), "--output_folder", str(out),
        "--select_n_sentences", S2S_SELECT, "--number_of_epochs", "2",
        "--pretrained_lm_path", str(s2s_lm_folder), "--noprogressbar", *S2S_TINY,
    ]
    cmd = [sys.executable, "train_S2S.py", *args]
    killed = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**ENV, KILL_ENV: "2:1"}, timeout=600
    )
    after_kill = {"returncode": killed.returncode, "epochs": logged_epochs(out / "train_log.txt"),
                  "ckpt_epochs": [m["epoch"] for m in ckpt_metas(out)]}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "args": args, "after_kill": after_kill, "lm": s2s_lm_folder}


@pytest.fixture(scope="session")
def ctc_random_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CTC demo configuration's run with a zero learning rate: its checkpoint holds the
    random initial weights, whose transcripts are long strings of characters (a trained short
    run only emits blanks), so comparing them tests every step of a pipeline; its test stage
    runs one utterance per batch (no padding)."""
    out = tmp_path_factory.mktemp("ctc_random") / "run"
    cmd = [
        sys.executable, "train_CTC.py", str(CTC_DEMO), "--data_folder", str(demo_corpus),
        "--output_folder", str(out), "--select_n_sentences", "[16, 8, 16, 8]",
        "--number_of_epochs", "1", "--lr_model", "0.0", "--noprogressbar",
        "--test_dataloader_opts", "{batch_size: 1}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def ctc_export(ctc_random_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight CTC demo run exported by export.py."""
    out = tmp_path_factory.mktemp("export") / "demo-ctc"
    cmd = [sys.executable, "export.py", str(ctc_random_run), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def ctc_graph_export(ctc_random_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight CTC demo run exported by export.py with every graph format:
    --format onnx pt2 --quantize int8."""
    out = tmp_path_factory.mktemp("graph-export") / "demo-ctc"
    cmd = [sys.executable, "export.py", str(ctc_random_run), "--out", str(out),
           "--format", "onnx", "pt2", "--quantize", "int8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
