"""S2S recipe: configurations, tokenizer, LM files, a run killed and resumed, beam search.

One short run (tests/runs.py: 2 epochs of ``hparams/S2S/demo.yaml`` shrunk, on a slice of the
demo corpus, with a random tiny LM in the demo LM's architecture) is made once per session:
killed inside its second checkpoint save, then finished by the same command. The tests that
decode read it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import speechbrain as sb
import torch
from config_keys import DEMO_CONFIGS, assert_asr_family, assert_finetunes_demo
from conftest import (
    RECIPE_CODE,
    REPO,
    assert_two_process_epoch,
    logged_epochs,
    n_params,
)
from hyperpyyaml import load_hyperpyyaml
from mps_kernels import assert_mps_ready, record_recipe
from param_counts import s2s_mamba_model_params
from runs import S2S_N_TEST, S2S_SELECT, S2S_TINY, ckpt_metas

import train_S2S
from mamba_asr import data
from mamba_asr.config import ConfigError, cli, load_config
from mamba_asr.losses import ctc_loss
from mamba_asr.reports.curves import read_test_lines, read_train_log
from mamba_asr.reports.wer_table import read_wer_file
from mamba_asr.tokenizer import prepare_tokenizer, read_sentences

S2S = REPO / "hparams" / "S2S"
CONFIGS = sorted(p.stem for p in S2S.glob("*.yaml"))
# hparams['model'] totals: xi-j/Mamba-ASR's (REFERENCE.md) and our demo's, from its
# architecture (ConMamba encoder and Mamba decoder as conmambamamba_*, tests/param_counts.py).
DEMO_ARCHITECTURE = {"d": 144, "f": 576, "enc_layers": 2, "dec_layers": 1, "vocab": 256,
                     "n_mels": 40, "channels": (32, 16)}
PARAMS = {
    "conformer_small": 13_327_296,
    "conmamba_small": 14_075_520,
    "conmambamamba_small": 14_570_880,  # the paper says 15.0 M, which no upstream setting gives
    "conformer_large": 109_136_048,
    "conmamba_large": 115_187_888,
    "conmambamamba_large": 122_917_040,
    "demo": s2s_mamba_model_params(**DEMO_ARCHITECTURE),
    "finetune_demo": s2s_mamba_model_params(**DEMO_ARCHITECTURE),  # the demo model, adapted
}
DECODERS = {"conformer": "transformer", "conmamba": "transformer", "conmambamamba": "mamba"}
SCRIPTS = [REPO / "train_S2S.py", *RECIPE_CODE]
SELECT, N_TEST, TINY = S2S_SELECT, S2S_N_TEST, S2S_TINY


def _load(name: str, **overrides: object) -> dict:
    with open(S2S / f"{name}.yaml", encoding="utf-8") as f:
        return load_hyperpyyaml(f, overrides)


# --------------------------------------------------------------------------- configurations


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_offline_with_upstream_totals(name: str, tmp_path: Path, monkeypatch) -> None:
    """Only data_folder given: loads without network, builds upstream's model and decodes."""
    monkeypatch.chdir(tmp_path)  # output_folder is relative: keep results/ out of the repo
    hparams = _load(name, data_folder=str(tmp_path))
    assert n_params(hparams["model"]) == PARAMS[name]
    assert hparams["output_folder"].startswith("results/")
    stem = name.rsplit("_", 1)[0]
    decoder = DECODERS.get(stem, "mamba")
    assert hparams["Transformer"].decoder_module == decoder
    mamba = decoder == "mamba"
    searcher = train_S2S.S2SMambaBeamSearcher if mamba else train_S2S.S2STransformerBeamSearcher
    assert hparams["valid_search"].func is hparams["test_search"].func is searcher
    assert hparams["ctc_cost"].func is ctc_loss  # runs on Apple MPS too
    feats = hparams["compute_features"](torch.randn(2, 16000))
    src = hparams["CNN"](feats)
    tokens = torch.tensor([[1, 5, 7], [1, 9, 0]])
    enc, dec = hparams["Transformer"](src, tokens, torch.tensor([1.0, 0.8]))
    assert hparams["ctc_lin"](enc).shape == (2, src.shape[1], hparams["output_neurons"])
    assert hparams["seq_lin"](dec).shape == (2, 3, hparams["output_neurons"])
    if name not in DEMO_CONFIGS:
        assert hparams["output_neurons"] == 5000
        assert hparams["pretrained_lm_path"] == "results/LM/transformer/2223/export"


def test_mamba_decoder_totals_by_hand_are_upstreams() -> None:
    """The formula that gives the demo's total reproduces upstream's conmambamamba totals."""
    assert s2s_mamba_model_params(144, 1024, 12, 4, 5000) == PARAMS["conmambamamba_small"]
    assert s2s_mamba_model_params(512, 2048, 12, 6, 5000) == PARAMS["conmambamamba_large"]


def test_full_configs_declare_the_librispeech_transformer_lm(tmp_path: Path) -> None:
    paths = {"data_folder": str(tmp_path), "output_folder": str(tmp_path)}
    lm = _load("conformer_small", **paths)["lm_model"]()
    assert n_params(lm) == 93_333_128  # SpeechBrain's LibriSpeech Transformer LM
    with open(REPO / "hparams" / "LM" / "transformer.yaml", encoding="utf-8") as f:
        lm_recipe = load_hyperpyyaml(f, paths)["model"]
    shapes = {k: v.shape for k, v in lm_recipe.state_dict().items()}
    assert {k: v.shape for k, v in lm.state_dict().items()} == shapes


def test_configurations_and_declared_keys() -> None:
    assert_asr_family(S2S, train_S2S.KEYS, SCRIPTS, {"ctc_weight", "lm_weight", "keep_best_by"})


def test_finetune_demo_adapts_the_demo_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    finetune = _load("finetune_demo", data_folder=str(tmp_path))
    demo = _load("demo", data_folder=str(tmp_path))
    assert_finetunes_demo(finetune, demo)
    # the source's tokenizer and LM: the output layers keep their meaning
    for key in ("pretrained_lm_path", "pretrained_tokenizer_path", "output_neurons"):
        assert finetune[key] == demo[key], key


# --------------------------------------------------------------------------- clear errors


def _demo_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        str(S2S / "demo.yaml"), "--data_folder", str(tmp_path),
        "--output_folder", str(tmp_path / "out"), *extra,
    ]


def _config_error(argv: list[str]) -> str:
    _, hparams, _, _ = load_config(argv, train_S2S.KEYS)
    with pytest.raises(ConfigError) as info:
        train_S2S.check_config(hparams)
    return str(info.value)


def test_bad_values_are_config_errors(tmp_path: Path) -> None:
    none = ["--pretrained_lm_path", "null"]
    assert "keep_best_by must be one of ACC, WER, not 'CER'" in _config_error(
        _demo_argv(tmp_path, *none, "--keep_best_by", "CER")
    )
    assert "set valid_search_interval 1" in _config_error(
        _demo_argv(tmp_path, *none, "--keep_best_by", "WER")
    )
    assert "valid_search_interval must be an integer >= 1, not 0" in _config_error(
        _demo_argv(tmp_path, *none, "--valid_search_interval", "0")
    )
    assert "ctc_weight must be between 0 and 1, not 1.5" in _config_error(
        _demo_argv(tmp_path, *none, "--ctc_weight", "1.5")
    )
    # The Mamba-decoder searcher on a Transformer decoder fails before training, not at test.
    hparams = _load("conformer_small", data_folder=str(tmp_path), output_folder=str(tmp_path),
                    pretrained_lm_path=None)
    train_S2S.check_config(hparams)
    hparams["test_search"] = functools.partial(train_S2S.S2SMambaBeamSearcher, beam_size=2)
    with pytest.raises(ConfigError, match="test_search: S2SMambaBeamSearcher needs decoder_module"):
        train_S2S.check_config(hparams)


def test_missing_lm_file_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    """A folder without lm.ckpt fails before any data is prepared, naming the file."""
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "tokenizer.ckpt").write_bytes(b"x")
    argv = _demo_argv(tmp_path, "--pretrained_lm_path", str(folder))
    with pytest.raises(ConfigError, match=rf"lm\.ckpt is missing from {re.escape(str(folder))}"):
        train_S2S.main(argv)
    assert not (tmp_path / "out" / "prepared").exists()
    # On the command line: one error line, exit status 2.
    monkeypatch.setattr(sys, "argv", ["train_S2S.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli(train_S2S.main)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: lm file lm.ckpt is missing from {folder} (the folder holds: ")
    # Without the LM (no_lm) the LM file is not needed, but the tokenizer still is.
    (folder / "tokenizer.ckpt").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer\.ckpt is missing"):
        train_S2S.main([*argv, "--no_lm", "True"])


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture
def manifests(s2s_manifests: Path) -> Path:
    return s2s_manifests


def test_tokenizer_trained_then_reloaded_encodes_identically(
    manifests: Path, tmp_path: Path
) -> None:
    train_csv = manifests / "train.csv"
    hparams = _load(
        "demo", data_folder=str(tmp_path), output_folder=str(tmp_path / "out"),
        pretrained_lm_path=None, train_csv=str(train_csv),
    )
    trained = train_S2S.prepare_run_tokenizer(hparams)
    run_file = Path(hparams["tokenizer_file"])
    assert run_file.is_file()
    shutil.rmtree(Path(hparams["save_folder"]) / "tokenizer")  # reloading needs only the copy
    reloaded = train_S2S.prepare_run_tokenizer(hparams)
    sentences = read_sentences(train_csv)
    assert [trained.encode_as_ids(s) for s in sentences] == [
        reloaded.encode_as_ids(s) for s in sentences
    ]
    assert all(reloaded.decode_ids(reloaded.encode_as_ids(s)) == s for s in sentences)
    pieces = (reloaded.get_piece_size(), reloaded.unk_id(), reloaded.bos_id(), reloaded.eos_id())
    assert pieces == (256, 0, 1, 2)
    # Another tokenizer given later is refused: the run's checkpoints were trained with this one.
    other = prepare_tokenizer(tmp_path / "bpe", 256, train_csv, model_type="bpe")
    hparams["pretrained_tokenizer_path"] = str(tmp_path / "bpe" / "256_bpe.model")
    assert other.encode_as_ids(sentences[0]) != reloaded.encode_as_ids(sentences[0])
    with pytest.raises(ConfigError, match=f"differs from {re.escape(str(run_file))}"):
        train_S2S.prepare_run_tokenizer(hparams)


# --------------------------------------------------------------------------- the run


@pytest.fixture
def lm_folder(s2s_lm_folder: Path) -> Path:
    return s2s_lm_folder


@pytest.fixture
def run(s2s_run: dict) -> dict:
    """The shared S2S run (tests/runs.py): killed in its second checkpoint save, finished."""
    return s2s_run


@pytest.mark.slow
def test_recipe_batches_run_only_operators_mps_has(
    demo_corpus: Path, lm_folder: Path, tmp_path: Path
) -> None:
    """One epoch of the S2S demo recipe on a few utterances under the operator recorder
    (training, validation and test batches: the joint CTC/attention loss, the Mamba-decoder
    beam search with the CTC and LM scorers): every operator has an MPS kernel or runs on
    the CPU there, no float64 tensor (tests/test_mps_support.py)."""
    recorded = record_recipe("train_S2S.py", [
        str(S2S / "demo.yaml"), "--data_folder", str(demo_corpus), "--output_folder",
        str(tmp_path / "run"), "--select_n_sentences", "[16, 4, 4, 4]",
        "--number_of_epochs", "1", "--valid_search_interval", "1",
        "--pretrained_lm_path", str(lm_folder), "--noprogressbar", *TINY[:4],
        "--valid_beam_size", "2", "--test_beam_size", "2"], tmp_path)
    assert "aten::topk" in recorded["ops"]  # the beam search ran
    assert_mps_ready(recorded)


@pytest.mark.slow
def test_killed_run_resumes_to_the_configured_epochs(run: dict) -> None:
    out = run["out"]
    # Killed after the first file of the second save: epoch 2 logged, only epoch 1 saved.
    assert run["after_kill"] == {"returncode": -signal.SIGKILL, "epochs": [1, 2],
                                 "ckpt_epochs": [1]}
    # The rerun resumed from epoch 1 and trained epoch 2 again.
    assert logged_epochs(out / "train_log.txt") == [1, 2, 2]
    metas = sorted(ckpt_metas(out), key=lambda m: m["epoch"])
    assert [m["epoch"] for m in metas] == [1, 2]
    assert all(0.0 <= m["ACC"] <= 1.0 for m in metas)
    assert "WER" not in metas[0] and "WER" in metas[1]  # valid search every 2 epochs
    assert not [p for p in (out / "save").iterdir() if p.name.startswith(".")]
    log = read_train_log(out / "train_log.txt")
    assert pd.isna(log["valid WER"].iloc[0]) and log["valid WER"].iloc[-1] >= 0
    assert (log["skipped_steps"] == 0).all()
    tests = read_test_lines(out / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"]  # with the LM: no no_lm/
    for _, row in tests.iterrows():
        header = read_wer_file(out / f"wer_{row['test set']}.txt")
        assert header["sentences"] == row["test utterances"] == N_TEST
        assert abs(header["WER"] - row["test WER"]) <= 0.01 * max(1.0, header["WER"])
    # ASR and LM share one tokenizer: the run's copy is the LM folder's.
    assert (out / "save" / "tokenizer.ckpt").read_bytes() == (
        run["lm"] / "tokenizer.ckpt"
    ).read_bytes()


def _encode(brain: train_S2S.ASR, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output (B, T', d_model) and relative lengths (B,) of a test batch."""
    wavs, lens = batch.sig
    feats = brain.modules.normalize(brain.hparams.compute_features(wavs), lens)
    return brain.modules.Transformer.encode(brain.modules.CNN(feats), lens), lens


@pytest.mark.slow
def test_beam_search_with_and_without_lm(run: dict, tmp_path: Path) -> None:
    """Deterministic with and without LM; lm_weight changes the scores; the recipe's test
    results are what the LM-fused search gives."""
    _, hparams, run_opts, _ = load_config(run["args"], train_S2S.KEYS, write_output=False)
    brain = train_S2S.build_brain(hparams, run_opts, hparams["checkpointer"])
    assert brain.lm is not None
    tests = data.test_sets(hparams)
    train_S2S.add_pipelines(hparams, brain.tokenizer, None, list(tests.values()))
    # The averaged checkpoints reproduce the run's test-clean results exactly.
    results = brain.evaluate_test_sets(
        {"test-clean": tests["test-clean"]}, hparams["test_dataloader_opts"], tmp_path
    )
    assert results["test-clean"]["utterances"] == N_TEST
    ours = (tmp_path / "wer_test-clean.txt").read_text()
    assert ours == (run["out"] / "wer_test-clean.txt").read_text()

    batch = next(iter(sb.dataio.dataloader.make_dataloader(tests["test-clean"], batch_size=4)))
    with torch.no_grad():
        enc, lens = _encode(brain, batch)

        def search(lm: torch.nn.Module | None, **changes: float) -> tuple[list, torch.Tensor]:
            searcher = train_S2S.build_searcher({**hparams, **changes}, "test_search", lm)
            hyps, _, scores, _ = searcher(enc, lens)
            return hyps, scores

        with_lm, again = search(brain.lm), search(brain.lm)
        no_lm, no_lm_again = search(None), search(None)
        other_weight = search(brain.lm, lm_weight=0.2)
    assert with_lm[0] == again[0] and torch.equal(with_lm[1], again[1])
    assert no_lm[0] == no_lm_again[0] and torch.equal(no_lm[1], no_lm_again[1])
    assert all(len(h) > 0 for h in with_lm[0] + no_lm[0])
    assert not torch.allclose(with_lm[1], other_weight[1])
    assert not torch.allclose(with_lm[1], no_lm[1])


@pytest.mark.slow
def test_no_lm_reevaluates_without_loading_the_lm(run: dict, tmp_path: Path) -> None:
    """--no_lm True on a finished run decodes again into no_lm/, without opening lm.ckpt."""
    out, lm = tmp_path / "run", tmp_path / "lm"
    shutil.copytree(run["out"], out)
    shutil.copytree(run["lm"], lm)
    (lm / "lm.ckpt").unlink()
    args = list(run["args"])
    args[args.index("--output_folder") + 1] = str(out)
    args[args.index("--pretrained_lm_path") + 1] = str(lm)
    train_S2S.main([*args, "--no_lm", "True"])
    assert logged_epochs(out / "train_log.txt") == [1, 2, 2]  # nothing trained
    tests = read_test_lines(out / "train_log.txt")
    assert list(tests["test set"])[-2:] == ["no_lm/test-clean", "no_lm/test-other"]
    for name in ("test-clean", "test-other"):
        header = read_wer_file(out / "no_lm" / f"wer_{name}.txt")
        assert header["sentences"] == N_TEST


@pytest.mark.slow
def test_evaluate_reproduces_the_run(run: dict, tmp_path: Path) -> None:
    """evaluate.py on the run's save folder (its best checkpoints by ACC, averaged, as the
    recipe does) writes the run's test-clean results with the LM (the run's
    pretrained_lm_path by default); without it, into no_lm/, leaving the LM-fused ones."""
    test_csv = str(run["out"] / "prepared" / "test-clean.csv")
    out = tmp_path / "eval"
    for extra, results in (([], out), (["--no_lm", "True"], out / "no_lm")):
        cmd = [
            sys.executable, "evaluate.py", str(S2S / "demo.yaml"), "--ckpt",
            str(run["out"] / "save"), "--test_csv", test_csv, "--out_dir", str(out),
            "--noprogressbar", *TINY, *extra,
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        wer = read_wer_file(results / "wer_test-clean.txt")
        assert wer["sentences"] == N_TEST
        assert f"test-clean: WER {wer['WER']:.2f} %" in proc.stdout
        assert "by valid ACC, highest first" in proc.stdout
        lm = f"LM {run['lm']} (lm_weight " if not extra else "no LM"
        assert f"S2SMambaBeamSearcher, beam size 3, ctc_weight_decode 0.4, {lm}" in proc.stdout
        # the LM-fused results stay the run's
        assert (out / "wer_test-clean.txt").read_text() == (
            run["out"] / "wer_test-clean.txt"
        ).read_text()


@pytest.mark.slow
def test_torchrun_two_processes(demo_corpus: Path, lm_folder: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: each trains half of the batches, gradients averaged
    (one optimizer step per pair), rank 0 alone checkpoints and writes the test results."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "train_S2S.py", str(S2S / "demo.yaml"), "--data_folder", str(demo_corpus),
        "--output_folder", str(out), "--select_n_sentences", SELECT, "--number_of_epochs", "1",
        "--pretrained_lm_path", str(lm_folder), "--noprogressbar", *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hparams = _load("demo", data_folder=str(demo_corpus), output_folder=str(out))
    assert_two_process_epoch(out, hparams)
    tests = read_test_lines(out / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"]
    assert read_wer_file(out / "wer_test-clean.txt")["sentences"] == N_TEST
