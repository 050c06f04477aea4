"""export.py: a model folder SpeechBrain's own EncoderASR / EncoderDecoderASR load offline and
in place, giving the hypotheses evaluate.py wrote for the same checkpoints; its model card and
checksums (a changed file is refused); an inference-only configuration; atomic writing."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, n_params
from runs import S2S_N_TEST, S2S_TINY
from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR

import evaluate
import export
from mamba_asr import data
from mamba_asr.config import ConfigError
from mamba_asr.model_card import CARD_FILE, CardError, verify_folder
from mamba_asr.trained import load_trained, trained_config
from mamba_asr.transcriber import Transcriber

# Keys of the training configuration an inference folder must not carry.
TRAINING_ONLY = ("data_folder", "train_csv", "valid_csv", "test_csv", "noam_annealing",
                 "model_opt_class", "fea_augment", "speed_perturb", "checkpointer",
                 "epoch_counter", "train_logger", "ctc_cost", "seq_cost", "output_folder")


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file's mtime and sha256 (and so the set of files: links would show up too)."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_mtime_ns, hashlib.sha256(p.read_bytes())
                                     .hexdigest() if p.is_file() else "")
        for p in sorted(folder.rglob("*"))
    }


def _run_hypotheses(scores: Path) -> dict[str, list[str]]:
    """Utterance id -> hypothesis words, from a recipe's / evaluate.py's wer_<set>.json."""
    doc = json.loads(scores.read_text())
    return {u["key"]: u["hyp_tokens"] for u in doc["WER"]["utterances"]}


def _test_files(run: Path) -> dict[str, str]:
    """Utterance id -> audio path of the run's test-clean manifest."""
    folder = trained_config(run / "save")["data_folder"]
    dataset = data.load_manifest(run / "prepared" / "test-clean.csv", str(folder))
    return {uid: dataset.data[uid]["wav"] for uid in dataset.data_ids}


def _export(argv: list[str]) -> Path:
    proc = subprocess.run([sys.executable, "export.py", *argv], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(argv[argv.index("--out") + 1])


@pytest.mark.slow
def test_ctc_export_loads_in_speechbrain_as_evaluated(
    ctc_random_run: Path, ctc_export: Path, tmp_path: Path
) -> None:
    """SpeechBrain's EncoderASR, from the folder in place, transcribes the test set as
    evaluate.py decodes the same checkpoints, every random-weight transcript character for
    character (one utterance per batch: no padding); the folder is left byte for byte as it
    was, with no link or file added; our Transcriber gives the same words."""
    before = _snapshot(ctc_export)
    evaluate.main([
        str(REPO / "hparams" / "CTC" / "demo.yaml"), "--ckpt", str(ctc_random_run / "save"),
        "--test_csv", str(ctc_random_run / "prepared" / "test-clean.csv"), "--out_dir",
        str(tmp_path), "--test_dataloader_opts", "{batch_size: 1}", "--noprogressbar",
    ])
    expected = _run_hypotheses(tmp_path / "wer_test-clean.json")
    assert expected == _run_hypotheses(ctc_random_run / "wer_test-clean.json")
    assert len(expected) == 16 and sum(len("".join(h)) for h in expected.values()) > 200
    asr = EncoderASR.from_hparams(source=str(ctc_export), savedir=str(ctc_export))
    files = _test_files(ctc_random_run)
    got = {uid: asr.transcribe_file(files[uid]).split() for uid in expected}
    assert got == expected
    assert _snapshot(ctc_export) == before

    ours = Transcriber.from_folder(ctc_export, max_batch_seconds=0)
    texts = [t.text.split() for t in ours.transcribe([files[u] for u in expected])]
    assert dict(zip(expected, texts, strict=True)) == expected


@pytest.mark.slow
def test_ctc_card_describes_the_run(ctc_random_run: Path, ctc_export: Path) -> None:
    card = verify_folder(ctc_export)
    assert sorted(card["files"]) == sorted(
        ["asr.ckpt", "normalizer.ckpt", "tokenizer.ckpt", "hyperparams.yaml", "README.md"]
    )
    assert sorted(p.name for p in ctc_export.iterdir()) == sorted([*card["files"], CARD_FILE])
    run = ctc_random_run
    model = load_trained(str(run / "hyperparams.yaml"), [str(run / "save")], [])
    assert card["parameters"] == n_params(model.hparams["model"])
    assert card["family"] == "CTC" and card["speechbrain_class"] == "EncoderASR"
    assert card["architecture"].startswith("ConMamba encoder (2 layers, d_model 144)")
    with open(ctc_random_run / "prepared" / "train.csv", newline="") as f:
        durations = [float(r["duration"]) for r in csv.DictReader(f)]
    assert card["training_data"]["utterances"] == len(durations) == 16
    assert card["training_data"]["hours"] == round(sum(durations) / 3600, 3)
    scores = json.loads((ctc_random_run / "wer_test-clean.json").read_text())["WER"]["summary"]
    clean = [r for r in card["test_results"] if r["test_set"] == "test-clean"]
    assert clean == [{"test_set": "test-clean", "search": "test search",
                      "WER": round(scores["WER"], 2), "CER": clean[0]["CER"],
                      "utterances": 16}]
    for ckpt in (ctc_random_run / "save").glob("CKPT+*"):  # all (fewer than avg_checkpoints)
        assert ckpt.name in card["checkpoints"]
    sha = hashlib.sha256((ctc_random_run / "hyperparams.yaml").read_bytes()).hexdigest()
    assert card["config_sha256"] == sha
    assert len(card["git_commit"].split("+")[0]) == 40
    readme = (ctc_export / "README.md").read_text()
    assert f"{card['parameters']:,} parameters" in readme and "| test-clean |" in readme

    hparams_text = (ctc_export / "hyperparams.yaml").read_text()
    keys = re.findall(r"^(\w+):", hparams_text, flags=re.MULTILINE)  # the top-level keys
    assert "encoder" in keys and "pretrainer" in keys
    assert not [k for k in TRAINING_ONLY if k in keys]
    assert str(ctc_random_run) not in hparams_text and "data/demo" not in hparams_text


@pytest.mark.slow
def test_changed_file_is_refused(ctc_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(ctc_export, folder)
    verify_folder(folder)
    with open(folder / "tokenizer.ckpt", "a") as f:
        f.write("' => 31\n")
    with pytest.raises(CardError, match=r"copy/tokenizer\.ckpt: changed since export"):
        Transcriber.from_folder(folder)
    (folder / "tokenizer.ckpt").unlink()
    with pytest.raises(CardError, match=r"copy/tokenizer\.ckpt: missing"):
        verify_folder(folder)
    (folder / CARD_FILE).unlink()
    with pytest.raises(CardError, match="not an exported model folder"):
        verify_folder(folder)


@pytest.mark.slow
def test_export_is_atomic(
    ctc_random_run: Path, ctc_export: Path, tmp_path: Path, monkeypatch
) -> None:
    """An export that fails while writing leaves nothing (nor its temporary folder), and
    with --overwrite the existing folder as it was; one that cannot start writes nothing."""
    import mamba_asr.export

    copy = shutil.copyfile

    def disk_full(src, dst, *args, **kwargs):
        if Path(dst).name == "tokenizer.ckpt":
            raise OSError(28, "No space left on device")
        return copy(src, dst, *args, **kwargs)

    models = tmp_path / "models"
    shutil.copytree(ctc_export, models / "x")
    before = _snapshot(models / "x")
    monkeypatch.setattr(mamba_asr.export.shutil, "copyfile", disk_full)
    for out, extra in ((models / "y", []), (models / "x", ["--overwrite"])):
        with pytest.raises(OSError, match="No space left"):
            export.main([str(ctc_random_run), "--out", str(out), *extra])
        assert sorted(p.name for p in models.iterdir()) == ["x"]
    assert _snapshot(models / "x") == before
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="already exists: pass --overwrite"):
        export.main([str(ctc_random_run), "--out", str(models / "x")])

    run = tmp_path / "run"  # a moved run reads its own save folder
    shutil.copytree(ctc_random_run, run)
    (run / "save" / "label_encoder.txt").unlink()
    with pytest.raises(ConfigError, match="run/save/label_encoder.txt not found"):
        export.main([str(run), "--out", str(models / "z")])
    for ckpt in (run / "save").glob("CKPT+*"):  # incomplete checkpoints are not candidates
        (ckpt / "normalizer.ckpt").unlink()
    shutil.copy(ctc_random_run / "save" / "label_encoder.txt", run / "save")
    with pytest.raises(ConfigError, match="run/save holds no checkpoint with a valid WER"):
        export.main([str(run), "--out", str(models / "z")])
    assert sorted(p.name for p in models.iterdir()) == ["x"]


@pytest.mark.slow
def test_s2s_folders_load_in_speechbrain_as_evaluated(s2s_run: dict, tmp_path: Path) -> None:
    """EncoderDecoderASR (Mamba decoder, cached beam search, CTC + LM scorers) gives the run's
    LM-fused test hypotheses (re-evaluated one utterance per batch: no padding); the --no_lm
    export (from the configuration + --ckpt) those without LM; the LM is a file of the first
    and not of the second. Ours gives both from the first folder."""
    run = tmp_path / "run"
    shutil.copytree(s2s_run["out"], run)
    files = _test_files(run)
    with_lm = _export([str(run), "--out", str(tmp_path / "s2s")])
    no_lm = _export([str(REPO / "hparams" / "S2S" / "demo.yaml"), "--ckpt", str(run / "save"),
                     "--out", str(tmp_path / "s2s-nolm"), "--no_lm", *S2S_TINY])
    assert (with_lm / "lm.ckpt").is_file() and not (no_lm / "lm.ckpt").exists()
    args = list(s2s_run["args"])
    args[args.index("--output_folder") + 1] = str(run)
    for extra in ([], ["--no_lm", "True"]):  # the run's test results, one utterance per batch
        subprocess.run(
            [sys.executable, "train_S2S.py", *args, *extra, "--test_dataloader_opts",
             "{batch_size: 1}"], cwd=REPO, check=True, capture_output=True,
        )
    for folder, scores in ((with_lm, run / "wer_test-clean.json"),
                           (no_lm, run / "no_lm" / "wer_test-clean.json")):
        before = _snapshot(folder)
        asr = EncoderDecoderASR.from_hparams(source=str(folder), savedir=str(folder))
        expected = _run_hypotheses(scores)
        assert len(expected) == S2S_N_TEST
        got = {uid: asr.transcribe_file(files[uid]).split() for uid in expected}
        assert got == expected, folder
        assert _snapshot(folder) == before
    # ours, one file at a time: the LM-fused folder with and without its LM
    for no_lm, scores in ((False, run / "wer_test-clean.json"),
                          (True, run / "no_lm" / "wer_test-clean.json")):
        expected = _run_hypotheses(scores)
        ours = Transcriber.from_folder(with_lm, no_lm=no_lm, max_batch_seconds=0)
        texts = [t.text.split() for t in ours.transcribe([files[u] for u in expected])]
        assert dict(zip(expected, texts, strict=True)) == expected, no_lm
