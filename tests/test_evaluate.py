"""evaluate.py: what ``--ckpt`` names, the run's configuration read as YAML, and, on a short
CTC demo run, a save folder evaluated as the recipe evaluates it, the checkpoints and search
it reports, and a 44.1 kHz manifest resampled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio
import yaml
from conftest import REPO
from hyperpyyaml import resolve_references
from runs import CTC_N_TEST

import evaluate
from mamba_asr import data, trained
from mamba_asr.config import ConfigError, load_config

CTC_DEMO = REPO / "hparams" / "CTC" / "demo.yaml"
S2S_DEMO = REPO / "hparams" / "S2S" / "demo.yaml"
N_TEST = CTC_N_TEST


def _checkpoint(folder: Path, **meta: object) -> Path:
    """A folder that SpeechBrain reads as a checkpoint (its CKPT.yaml)."""
    folder.mkdir(parents=True)
    (folder / "CKPT.yaml").write_text(yaml.safe_dump({"end-of-epoch": True, **meta}))
    return folder


def test_ckpt_names_a_save_folder_or_checkpoints(tmp_path: Path) -> None:
    save = tmp_path / "run" / "save"
    a = _checkpoint(save / "CKPT+a", epoch=1, WER=50.0)
    b = _checkpoint(save / "CKPT+b", epoch=2, WER=40.0)
    # the save folder or the run folder: the best checkpoints are chosen later
    assert trained.checkpoint_source([str(save)]) == (save, None)
    assert trained.checkpoint_source([str(tmp_path / "run")]) == (save, None)
    folder, ckpts = trained.checkpoint_source([str(b), str(a)])
    assert folder == save and [Path(c.path) for c in ckpts] == [b, a]
    assert ckpts[1].meta["WER"] == 50.0
    with pytest.raises(ConfigError, match=f"--ckpt {save} is not a CKPT.* folder: give one save"):
        trained.checkpoint_source([str(a), str(save)])
    with pytest.raises(ConfigError, match="--ckpt .*missing: no such folder"):
        trained.checkpoint_source([str(tmp_path / "missing")])


def test_run_configuration_is_read_as_yaml_without_building(tmp_path: Path) -> None:
    """hyperparams.yaml as SpeechBrain writes it (references resolved, comments and
    HyperPyYAML tags kept): the run's values come back as they were, nothing is built."""
    odd = "/data/my corpus: #1 \"x\""
    resolved = resolve_references(
        S2S_DEMO.read_text(), {"data_folder": odd, "pretrained_lm_path": None}
    ).getvalue()
    # a tag whose object cannot be built, and a value with a trailing comment
    resolved += "unbuildable: !new:no_such_module.Thing\n  x: 1\n"
    resolved = resolved.replace("avg_checkpoints: 3", "avg_checkpoints: 2  # the best two")
    (tmp_path / "hyperparams.yaml").write_text(resolved)
    save = tmp_path / "save"
    config = trained.trained_config(save)
    assert config["data_folder"] == odd and config["pretrained_lm_path"] is None
    assert config["avg_checkpoints"] == 2 and config["keep_best_by"] == "ACC"
    assert config["unbuildable"].tag.value == "!new:no_such_module.Thing"

    given = ["--keep_best_by", "WER", "--avg_checkpoints=2"]
    overrides = trained.trained_overrides(save, trained.TRAINED_DEFAULTS, given)
    assert overrides[::2] == ["--data_folder", "--pretrained_lm_path"]
    # the overrides load back as the same values
    _, hparams, _, _ = load_config(
        [str(S2S_DEMO), *overrides, *given, "--output_folder", str(tmp_path / "out")],
        write_output=False,
    )
    assert hparams["data_folder"] == odd and hparams["pretrained_lm_path"] is None
    assert hparams["avg_checkpoints"] == 2 and hparams["keep_best_by"] == "WER"
    assert trained.trained_overrides(save, ("avg_checkpoints",), []) == [
        "--avg_checkpoints", "2"
    ]

    with pytest.raises(ConfigError, match="--data_folder is required"):
        trained.trained_overrides(tmp_path / "elsewhere" / "save", ("data_folder",), [])
    (tmp_path / "hyperparams.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="hyperparams.yaml: not a YAML file"):
        trained.trained_config(save)


# --------------------------------------------------------------------------- on a run


@pytest.fixture
def run(ctc_run: Path) -> Path:
    """The shared CTC demo run (tests/runs.py)."""
    return ctc_run


def _evaluate(capsys, *argv: str) -> tuple[dict, list[str]]:
    """evaluate.main's results and printed lines."""
    capsys.readouterr()
    results = evaluate.main([str(CTC_DEMO), *argv, "--noprogressbar"])
    return results, capsys.readouterr().out.splitlines()


def _scores(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_save_folder_is_what_the_recipe_evaluated(run: Path, tmp_path: Path, capsys) -> None:
    """--ckpt <run>/save: the recipe's averaged best checkpoints, byte for byte its results."""
    test_csv = run / "prepared" / "test-clean.csv"
    results, lines = _evaluate(capsys, "--ckpt", str(run / "save"), "--test_csv", str(test_csv),
                               "--out_dir", str(tmp_path))
    assert results["test-clean"]["utterances"] == N_TEST
    for suffix in (".txt", ".json"):
        ours = (tmp_path / f"wer_test-clean{suffix}").read_text()
        assert ours == (run / f"wer_test-clean{suffix}").read_text()
    names = sorted(p.name for p in (run / "save").glob("CKPT+*"))
    assert len(names) == 2 and lines[0].startswith("checkpoints: 2 checkpoint(s) averaged: ")
    assert sorted(n for n in names if n in lines[0]) == names
    assert lines[0].endswith(f"(the best of {run / 'save'} by valid WER, lowest first)")
    assert lines[1] == "search: greedy CTC decoding"
    assert lines[2].startswith(f"test-clean: WER {results['test-clean']['WER']:.2f} %")
    log = (tmp_path / "eval_log.txt").read_text().splitlines()
    assert log[0] == f"{lines[0]}, {lines[1]}"
    assert log[1].startswith("Epoch loaded: 2, test set: test-clean - test loss: ")


@pytest.mark.slow
def test_best_checkpoints_by_the_run_key_and_count(run: Path, tmp_path: Path, capsys) -> None:
    """The save folder's best avg_checkpoints (the run's value) by valid WER: with the
    older checkpoint made the better one and avg_checkpoints 1, that one alone."""
    copy = tmp_path / "run"
    shutil.copytree(run / "save", copy / "save")
    config = (run / "hyperparams.yaml").read_text()
    assert "\navg_checkpoints: 3" in config
    (copy / "hyperparams.yaml").write_text(config.replace("\navg_checkpoints: 3", "\n"
                                                          "avg_checkpoints: 1"))
    ckpts = {}
    for folder in (copy / "save").glob("CKPT+*"):
        meta = yaml.safe_load((folder / "CKPT.yaml").read_text())
        meta["WER"] = {1: 10.0, 2: 20.0}[meta["epoch"]]
        (folder / "CKPT.yaml").write_text(yaml.safe_dump(meta))
        ckpts[meta["epoch"]] = folder
    test_csv = str(run / "prepared" / "test-clean.csv")
    chosen, lines = _evaluate(capsys, "--ckpt", str(copy), "--test_csv", test_csv)
    assert lines[0] == (
        f"checkpoints: 1 checkpoint(s) averaged: {ckpts[1].name} (epoch 1, WER 10) (the best "
        f"of {copy / 'save'} by valid WER, lowest first)"
    )
    assert (copy / "eval" / "wer_test-clean.json").is_file()  # default out_dir: eval/
    given, lines = _evaluate(capsys, "--ckpt", str(ckpts[1]), "--test_csv", test_csv,
                             "--out_dir", str(tmp_path / "given"), "--test_search", "beam")
    assert lines[:2] == [
        f"checkpoints: 1 checkpoint(s) averaged: {ckpts[1].name} (epoch 1, WER 10)",
        "search: CTC prefix beam search, beam size 10",
    ]
    assert chosen["test-clean"]["loss"] == given["test-clean"]["loss"]  # the same weights
    both, _ = _evaluate(capsys, "--ckpt", str(ckpts[2]), str(ckpts[1]), "--test_csv", test_csv,
                        "--out_dir", str(tmp_path / "both"))
    assert both["test-clean"]["loss"] != chosen["test-clean"]["loss"]


def _resampled_manifest(csv_path: Path, data_folder: Path, folder: Path, rate: int) -> Path:
    """A copy of a manifest whose audio is the same recordings resampled to ``rate`` (WAV)."""
    dataset = data.load_manifest(csv_path, str(data_folder))
    lines = ["ID,duration,wav,spk_id,wrd"]
    folder.mkdir()
    for uid in dataset.data_ids:
        row = dataset.data[uid]
        sig, file_rate = sf.read(row["wav"], dtype="float32")
        wav = folder / f"{uid}.wav"
        resampled = torchaudio.functional.resample(torch.from_numpy(sig), file_rate, rate)
        sf.write(wav, resampled.numpy(), rate, subtype="PCM_16")
        lines.append(f"{uid},{row['duration']},{wav},{row['spk_id']},{row['wrd']}")
    out = folder.with_suffix(".csv")
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.slow
def test_44khz_manifest_is_resampled(run: Path, demo_corpus: Path, tmp_path: Path, capsys,
                                     caplog) -> None:
    """The test set as 44.1 kHz WAV files scores as the 16 kHz FLAC originals (the same loss:
    read as 16 kHz it would be 2.76 times slower speech), with one warning counting them."""
    test_csv = run / "prepared" / "test-clean.csv"
    cd = _resampled_manifest(test_csv, demo_corpus, tmp_path / "cd", 44100)
    with caplog.at_level("WARNING", logger="mamba_asr.data"):
        results, _ = _evaluate(capsys, "--ckpt", str(run / "save"), "--test_csv", str(test_csv),
                               str(cd), "--out_dir", str(tmp_path / "eval"))
    original, resampled = results["test-clean"], results["cd"]
    assert resampled["utterances"] == original["utterances"] == N_TEST
    assert resampled["loss"] == pytest.approx(original["loss"], rel=2e-3)
    hyps = [
        {u["key"]: u["hyp_tokens"] for u in _scores(tmp_path / "eval" / name)["WER"]["utterances"]}
        for name in ("wer_test-clean.json", "wer_cd.json")
    ]
    assert hyps[0] == hyps[1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "mamba_asr.data"]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"{N_TEST} of {2 * N_TEST} audio files are not at sample_rate 16000 Hz "
        f"({N_TEST} at 44100 Hz; e.g. {tmp_path / 'cd'}/"
    )
