"""CTC recipe: configurations, parameter counts, a short demo run, resuming, evaluate.py.

The demo run (2 epochs of ``hparams/CTC/demo.yaml`` on a slice of the demo corpus) is made
once per module and shared by the tests that read its outputs.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import speechbrain as sb
import torch
import yaml
from config_keys import assert_asr_family, assert_finetunes_demo
from conftest import (
    RECIPE_CODE,
    REPO,
    assert_two_process_epoch,
    logged_epochs,
    n_params,
    train_batches,
)
from hyperpyyaml import load_hyperpyyaml
from param_counts import ctc_model_params
from speechbrain.decoders.ctc import CTCPrefixBeamSearcher
from speechbrain.utils.run_opts import RunOptions

import train_CTC
from librispeech_prepare import LibriSpeechPrepError
from mamba_asr import data
from mamba_asr.brain import RecipeBrain
from mamba_asr.checkpoints import KILL_ENV, AtomicCheckpointer
from mamba_asr.config import ConfigError, PrecisionError, load_config, resolve_run_opts
from mamba_asr.losses import ctc_loss
from mamba_asr.reports.curves import read_test_lines, read_train_log
from mamba_asr.reports.wer_table import read_wer_file

CTC = REPO / "hparams" / "CTC"
CONFIGS = sorted(p.stem for p in CTC.glob("*.yaml"))
# Each configuration's model: (encoder, d_model, d_ffn, layers, mel bins, front-end channels).
ARCHITECTURES = {
    "conformer_large": ("conformer", 256, 1024, 18, 80, (64, 32)),
    "conmamba_large": ("conmamba", 256, 1024, 18, 80, (64, 32)),
    "conformer_small": ("conformer", 144, 1024, 12, 80, (64, 32)),
    "conmamba_small": ("conmamba", 144, 1024, 12, 80, (64, 32)),
    "demo": ("conmamba", 144, 576, 2, 40, (32, 16)),
    "finetune_demo": ("conmamba", 144, 576, 2, 40, (32, 16)),  # the demo model, adapted
    "conmamba_streaming_small": ("conmamba_causal", 144, 1024, 12, 80, (64, 32)),
    "conmamba_streaming_demo": ("conmamba_causal", 144, 576, 2, 40, (32, 16)),
    "conformer_streaming_demo": ("conformer", 144, 576, 4, 40, (32, 16)),  # DCT
    "conformer_streaming_small": ("conformer", 144, 1024, 12, 80, (64, 32)),  # DCT
}
# hparams['model'] totals of upstream's large pair (REFERENCE.md; the paper rounds them).
UPSTREAM_PARAMS = {"conformer_large": 28_786_111, "conmamba_large": 31_555_519}
PAPER_PARAMS = {"conformer_large": 28.8e6, "conmamba_large": 31.6e6}
SCRIPTS = [REPO / "train_CTC.py", *RECIPE_CODE]
# Demo run: 2 epochs on the first 160 training and 30 dev/test utterances of each split.
SELECT = "[160, 30, 30, 30]"
N_TEST = 30


def _load(name: str, folder: Path, **overrides: object) -> dict:
    with open(CTC / f"{name}.yaml", encoding="utf-8") as f:
        return load_hyperpyyaml(f, {"data_folder": str(folder), **overrides})


# --------------------------------------------------------------------------- configurations


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_only_data_folder(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # output_folder is relative: keep results/ out of the repo
    hparams = _load(name, tmp_path)
    assert hparams["output_folder"].startswith("results/")
    assert hparams["output_neurons"] == 3 + len(hparams["characters"]) == 31
    assert hparams["ctc_cost"].func is ctc_loss  # runs on Apple MPS too
    x = torch.randn(2, 16000)
    feats = hparams["compute_features"](x)
    src = hparams["CNN"](feats)
    enc, _ = hparams["Transformer"](src, None, torch.ones(2))
    assert hparams["ctc_lin"](enc).shape == (2, src.shape[1], 31)


def test_parameter_counts(tmp_path: Path, monkeypatch) -> None:
    """Every model has the parameters its architecture gives by hand (tests/param_counts.py);
    the formulas first reproduce upstream's exact totals of the large pair."""
    monkeypatch.chdir(tmp_path)
    assert sorted(ARCHITECTURES) == CONFIGS
    for name, total in UPSTREAM_PARAMS.items():
        assert ctc_model_params(*ARCHITECTURES[name]) == total, name
        assert abs(total / PAPER_PARAMS[name] - 1) < 0.02, name
    for name, architecture in ARCHITECTURES.items():
        assert n_params(_load(name, tmp_path)["model"]) == ctc_model_params(*architecture), name


def test_configurations_and_declared_keys() -> None:
    assert_asr_family(CTC, train_CTC.KEYS, SCRIPTS, {"sorting", "valid_csv", "ctc_cost"})


def test_finetune_demo_adapts_the_demo_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    finetune, demo = _load("finetune_demo", tmp_path), _load("demo", tmp_path)
    assert_finetunes_demo(finetune, demo)
    assert finetune["characters"] == demo["characters"]  # the same outputs: nothing skipped


# --------------------------------------------------------------------------- clear errors


def _config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv, train_CTC.KEYS)
    return str(info.value)


def test_configuration_errors_name_the_key(tmp_path: Path, monkeypatch) -> None:
    demo = str(CTC / "demo.yaml")
    base = [demo, "--data_folder", str(tmp_path), "--output_folder", str(tmp_path / "out")]
    assert "has no key 'nosuchkey'" in _config_error([*base, "--nosuchkey", "3"])
    assert "data_folder must be given" in _config_error([demo])
    assert "nothere.yaml does not exist" in _config_error([str(tmp_path / "nothere.yaml")])
    # A configuration without a key the recipe reads fails before anything runs.
    lacking = tmp_path / "lacking.yaml"
    lacking.write_text(re.sub(r"^sorting:.*$", "", Path(demo).read_text(), flags=re.M))
    message = _config_error([str(lacking), *base[1:]])
    assert "lacks the key(s) sorting" in message
    # An output folder that cannot be created (below a file).
    (tmp_path / "file").write_text("")
    message = _config_error([*base[:3], "--output_folder", str(tmp_path / "file" / "out")])
    assert "cannot be created" in message and "--output_folder" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda:0 asks for CUDA" in _config_error([*base, "--device", "cuda:0"])
    # Values every recipe checks before it writes anything (mamba_asr.config.start_run).
    for bad in ("0", "2.5"):
        with pytest.raises(ConfigError, match=f"cpu_threads must be null or an integer >= 1, "
                                               f"not {bad}"):
            train_CTC.main([*base, "--cpu_threads", bad])
    assert not (tmp_path / "out").exists()  # the errors leave no output folder behind


def test_data_errors_name_the_file(tmp_path: Path) -> None:
    hparams = {**dict.fromkeys(data.DATA_KEYS), "data_folder": str(tmp_path)}
    hparams.update(train_splits=["train-clean-100"], dev_splits=[], test_splits=[],
                   prep_folder=str(tmp_path / "prep"), skip_prep=False)
    with pytest.raises(LibriSpeechPrepError, match="train-clean-100 does not exist"):
        data.prepare_manifests(hparams)
    assert not (tmp_path / "prep" / "train.csv").exists()
    missing = tmp_path / "prep" / "train.csv"
    with pytest.raises(FileNotFoundError, match=f"manifest {missing} does not exist"):
        data.training_set({**hparams, "train_csv": str(missing), "sorting": "random"})


def test_command_line_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cmd = [sys.executable, "train_CTC.py", "hparams/CTC/demo.yaml", "--data_folder",
           str(tmp_path), "--output_folder", str(tmp_path / "o"), "--batch_sise", "8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --batch_sise: hparams/CTC/demo.yaml has no key 'batch_sise' (a command-line "
        "override can only change a key the YAML defines; check the spelling)"
    )
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- run options


def test_fp16_without_cuda_is_refused_before_anything_runs(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA GPU"):
        resolve_run_opts(RunOptions(device="cpu"), {"precision": "fp16"})
    cli = RunOptions(device="cpu", precision="fp16", overridden_args={"precision"})
    with pytest.raises(PrecisionError, match="--precision bf16"):
        resolve_run_opts(cli, {"precision": "fp32"})
    assert resolve_run_opts(RunOptions(device="cpu"), {"precision": "bf16"}).precision == "fp32"


def test_torchrun_without_cuda_uses_gloo(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    opts = resolve_run_opts(RunOptions(), {})
    assert opts.distributed_backend == "gloo" and "distributed_backend" in opts.overridden_args
    explicit = RunOptions(distributed_backend="mpi", overridden_args={"distributed_backend"})
    assert resolve_run_opts(explicit, {}).distributed_backend == "mpi"
    monkeypatch.delenv("RANK")
    assert resolve_run_opts(RunOptions(), {}).distributed_backend == "nccl"


class _Toy(RecipeBrain):
    def compute_forward(self, batch, stage):
        return self.modules.lin(batch)

    def compute_objectives(self, predictions, batch, stage):
        return predictions.sum()


def test_nonfinite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    lin = torch.nn.Linear(2, 1)
    hparams = {"max_consecutive_nonfinite": 3}
    brain = _Toy({"lin": lin}, lambda p: torch.optim.SGD(p, lr=0.1), hparams, {"device": "cpu"})
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    before = lin.weight.detach().clone()
    brain.fit_batch(torch.tensor([[float("nan"), 1.0]]))
    assert not brain.optimizer_stepped and brain.skipped_steps == 1
    assert brain.nonfinite_losses == 1 and brain.optimizer_step == 0
    assert torch.equal(lin.weight, before) and lin.weight.grad is None
    brain.fit_batch(torch.tensor([[1.0, 1.0]]))
    assert brain.optimizer_stepped and brain.optimizer_step == 1
    assert not torch.equal(lin.weight, before)
    with pytest.raises(RuntimeError, match="diverged"):
        for _ in range(3):
            brain.fit_batch(torch.tensor([[float("inf"), 1.0]]))


def test_dynamic_batches_reshuffled_every_epoch_in_one_process() -> None:
    items = {f"u{i}": {"duration": 1.0 + (i % 7) / 3} for i in range(60)}
    dataset = sb.dataio.dataset.DynamicItemDataset(items)
    dataset.set_output_keys(["id"])
    sampler = data.dynamic_batch_sampler(
        dataset, {"max_batch_length": 8, "num_buckets": 3, "shuffle": True, "seed": 1}
    )
    brain = _Toy({"lin": torch.nn.Linear(2, 1)}, None, {}, {"device": "cpu"})
    brain.make_dataloader(dataset, sb.Stage.TRAIN, batch_sampler=sampler)
    seen = {}
    for epoch in (1, 2, 1):
        brain.on_stage_start(sb.Stage.TRAIN, epoch)
        batches = [tuple(b) for b in sampler]
        assert seen.setdefault(epoch, batches) == batches  # deterministic: resumable
    assert seen[1] != seen[2]


# --------------------------------------------------------------------------- demo run


def _train(
    out: Path, data: Path, *extra: str, select: str = SELECT
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "train_CTC.py", "hparams/CTC/demo.yaml", "--data_folder", str(data),
        "--output_folder", str(out), "--select_n_sentences", select, "--noprogressbar", *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of the demo configuration on a slice of the demo corpus."""
    out = tmp_path_factory.mktemp("ctc") / "run"
    _train(out, demo_corpus, "--number_of_epochs", "2")
    return out


def assert_training_statistics(out: Path, log: pd.DataFrame) -> None:
    """The monitor's fields of a one-process run's epoch lines: gradient norms, clipped steps
    (all of the demo's: its norms exceed max_grad_norm 5 at the start), audio throughput
    (the manifest's audio, within speed perturbation's 5 %, over at most the time from the
    epoch's start to its line in log.txt), peak memory, ETA to 0 at the last epoch."""
    audio = pd.read_csv(out / "prepared" / "train.csv")["duration"].sum()
    stamps = re.findall(r"^(\S+ \S+) - \S+ - INFO - (Going into epoch |epoch: )(\d+)",
                        (out / "log.txt").read_text(), flags=re.M)
    start = {int(n): t for t, what, n in stamps if what.startswith("Going")}
    end = {int(n): t for t, what, n in stamps if what.startswith("epoch")}
    for epoch, row in log.iterrows():
        assert row["grad_norm_max"] >= row["grad_norm_mean"] > 0
        assert 0 <= row["clipped_steps"] <= row["steps"]
        assert row["audio_s_per_s_total"] == row["audio_s_per_s"] > 0
        span = (pd.Timestamp(end[epoch].replace(",", ".")) -
                pd.Timestamp(start[epoch].replace(",", "."))).total_seconds()
        assert 0.95 * audio / row["audio_s_per_s"] <= span + 0.01
        assert row["peak_mem_gb"] > 0
    assert log["eta"].iloc[-1] == "0:00:00"


@pytest.mark.slow
def test_demo_run_learns_and_reports(demo_run: Path) -> None:
    log = read_train_log(demo_run / "train_log.txt")
    assert list(log.index) == [1, 2]
    assert log.loc[2, "train loss"] < log.loc[1, "train loss"]
    assert (log["skipped_steps"] == 0).all()
    assert_training_statistics(demo_run, log)
    tests = read_test_lines(demo_run / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"]
    for _, row in tests.iterrows():
        header = read_wer_file(demo_run / f"wer_{row['test set']}.txt")
        assert header["sentences"] == row["test utterances"] == N_TEST
        assert math.isclose(header["WER"], row["test WER"], rel_tol=1e-2)
        assert row["Epoch loaded"] in (1, 2)
    assert (demo_run / "save" / "label_encoder.txt").is_file()


@pytest.mark.slow
def test_report_tools_on_the_run(demo_run: Path, tmp_path: Path) -> None:
    """The three report CLIs read what the recipe wrote."""
    def tool(name: str, *args: str) -> str:
        cmd = [sys.executable, "-m", f"mamba_asr.reports.{name}", *args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    png = tmp_path / "curves.png"
    tool("curves", str(demo_run / "train_log.txt"), "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = pd.read_csv(io.StringIO(tool("wer_table", "--csv", str(demo_run))))
    tests = read_test_lines(demo_run / "train_log.txt")
    assert sorted(table["test_set"]) == sorted(tests["test set"])
    for _, row in tests.iterrows():
        match = table[table["test_set"] == row["test set"]].iloc[0]
        assert math.isclose(match["WER"], row["test WER"], rel_tol=1e-2)
        assert match["sentences"] == N_TEST
    report = tool("errors", str(demo_run / "wer_test-clean.txt"), "--csv")
    rows = pd.read_csv(io.StringIO(report), dtype={"speaker": str})
    speakers = rows[rows["section"] == "speaker"]
    tested = pd.read_csv(demo_run / "prepared" / "test-clean.csv")["ID"][:N_TEST]
    assert set(speakers["speaker"].astype(str)) == {i.split("-")[0] for i in tested}
    header = read_wer_file(demo_run / "wer_test-clean.txt")
    assert speakers["sentences"].sum() == N_TEST
    for kind in ("ins", "del", "sub"):
        assert speakers[kind].sum() == header[kind]
    assert (speakers["count"] == speakers[["ins", "del", "sub"]].sum(axis=1)).all()


def _best_first(save: Path) -> list[Path]:
    """End-of-epoch checkpoints as the recipe ranks them: lowest WER, then most recent."""
    ckpts = []
    for d in save.glob("CKPT+*"):
        meta = yaml.safe_load((d / "CKPT.yaml").read_text())
        if "WER" in meta:
            ckpts.append((meta["WER"], -meta["unixtime"], d))
    return [d for *_, d in sorted(ckpts)]


@pytest.mark.slow
def test_evaluate_reproduces_the_run(demo_run: Path, tmp_path: Path) -> None:
    ckpts = _best_first(demo_run / "save")
    assert len(ckpts) == 2
    cmd = [
        sys.executable, "evaluate.py", "hparams/CTC/demo.yaml", "--ckpt", *map(str, ckpts),
        "--test_csv", str(demo_run / "prepared" / "test-clean.csv"), "--out_dir", str(tmp_path),
        "--noprogressbar",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = (tmp_path / "wer_test-clean.txt").read_text()
    assert ours == (demo_run / "wer_test-clean.txt").read_text()
    wer = read_wer_file(tmp_path / "wer_test-clean.txt")["WER"]
    assert f"test-clean: WER {wer:.2f} %" in proc.stdout


@pytest.mark.slow
def test_rerun_resumes_and_resume_from(demo_run: Path, demo_corpus: Path, tmp_path: Path) -> None:
    # The same command with one more epoch continues from the latest checkpoint.
    again = tmp_path / "again"
    shutil.copytree(demo_run, again)
    _train(again, demo_corpus, "--number_of_epochs", "3")
    assert logged_epochs(again / "train_log.txt") == [1, 2, 3]
    # resume_from a named checkpoint starts a new run there, once; a rerun continues.
    first = next(
        d for d in _best_first(demo_run / "save")
        if yaml.safe_load((d / "CKPT.yaml").read_text())["epoch"] == 1
    )
    fresh = tmp_path / "fresh"
    _train(fresh, demo_corpus, "--number_of_epochs", "2", "--resume_from", str(first))
    assert logged_epochs(fresh / "train_log.txt") == [2]
    _train(fresh, demo_corpus, "--number_of_epochs", "2", "--resume_from", str(first))
    assert logged_epochs(fresh / "train_log.txt") == [2]


def test_fp16_on_cpu_fails_before_training(demo_corpus: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    cmd = [
        sys.executable, "train_CTC.py", "hparams/CTC/demo.yaml", "--data_folder",
        str(demo_corpus), "--output_folder", str(tmp_path / "run"), "--precision", "fp16",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "fp16 needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "run" / "prepared").exists()


@pytest.mark.slow
def test_two_process_ddp_then_single_process_resume(demo_corpus: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo chosen automatically): both train their half of
    the batches, only rank 0 writes; the run then resumes in one process."""
    out, logs = tmp_path / "run", tmp_path / "torchrun"
    select = "[64, 16, 16, 16]"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--log_dir", str(logs), "--tee", "3", "train_CTC.py", "hparams/CTC/demo.yaml",
        "--data_folder", str(demo_corpus), "--output_folder", str(out),
        "--select_n_sentences", select, "--number_of_epochs", "1", "--noprogressbar",
        "--log_interval_steps", "2", "--tensorboard", "True",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    hparams = _load("demo", demo_corpus, output_folder=str(out))
    assert_two_process_epoch(out, hparams)
    # throughput: each process's, and their sum; the peak memory of the larger
    row = read_train_log(out / "train_log.txt").loc[1]
    rates = [float(r) for r in row["audio_s_per_s"].split()]
    assert len(rates) == 2 and min(rates) > 0
    assert row["audio_s_per_s_total"] == pytest.approx(sum(rates), rel=0.01, abs=0.1)
    assert row["peak_mem_gb"] > 0 and row["grad_norm_max"] >= row["grad_norm_mean"] > 0
    # every 2 steps both processes gather the interval; the first logs it, and alone writes
    # TensorBoard
    steps = re.findall(r"INFO - step: (\d+), .*audio_s_per_s: ([\d.]+) ([\d.]+), "
                       r"audio_s_per_s_total: ([\d.e+]+)", (out / "log.txt").read_text())
    assert [int(s) for s, *_ in steps] == list(range(2, row["steps"] + 1, 2))
    for _, a, b, total in steps:
        assert float(total) == pytest.approx(float(a) + float(b), rel=0.01, abs=0.1)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # Rank 0 alone wrote: one log line per stage, nothing logged by rank 1.
    assert len(read_test_lines(out / "train_log.txt")) == 2
    rank1 = [f for f in logs.rglob("*.log") if f.parent.name == "1"]
    assert len(rank1) == 2 and all("Epoch loaded" not in f.read_text() for f in rank1)

    _train(out, demo_corpus, "--number_of_epochs", "2", select=select)
    log = read_train_log(out / "train_log.txt")
    assert list(log.index) == [1, 2]
    n_batches = train_batches(hparams)  # continued the step count, in one process
    assert log.loc[2, "steps"] == math.ceil(n_batches / 2) + n_batches
    assert pd.isna(log.loc[2, "process_batches"])
    assert log.loc[2, "audio_s_per_s"] == log.loc[2, "audio_s_per_s_total"] > 0


@pytest.mark.slow
def test_killed_runs_resume_to_the_configured_epochs(demo_corpus: Path, tmp_path: Path) -> None:
    """SIGKILL inside a checkpoint save (test hook), then at a random moment, then the same
    command finishes all epochs from complete checkpoints only."""
    out, select = tmp_path / "run", "[64, 16, 16, 16]"
    cmd = [
        sys.executable, "train_CTC.py", "hparams/CTC/demo.yaml", "--data_folder",
        str(demo_corpus), "--output_folder", str(out), "--select_n_sentences", select,
        "--number_of_epochs", "3", "--noprogressbar",
    ]
    # 1. Killed after the first file of the second save (epoch 2 logged, not saved).
    env = {**os.environ, KILL_ENV: "2:1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert logged_epochs(out / "train_log.txt") == [1, 2]
    assert [yaml.safe_load((d / "CKPT.yaml").read_text())["epoch"]
            for d in (out / "save").glob("CKPT+*")] == [1]
    # 2. Killed at a random moment of the rerun (start-up, training, evaluation or a save),
    # which also saves intra-epoch checkpoints every 3 batches.
    cmd += ["--ckpt_interval_steps", "3"]
    seed = random.randrange(10**6)
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(random.Random(seed).uniform(0.0, 15.0))
    child.kill()
    child.communicate(timeout=60)
    # 3. The same command completes the run.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (seed, proc.stderr[-3000:])
    epochs = logged_epochs(out / "train_log.txt")
    assert epochs[:2] == [1, 2] and set(epochs) == {1, 2, 3} and epochs[-1] == 3, (seed, epochs)
    assert len(read_test_lines(out / "train_log.txt")) >= 2, seed
    save = out / "save"
    ckpter = _load("demo", demo_corpus, output_folder=str(out))["checkpointer"]
    assert isinstance(ckpter, AtomicCheckpointer) and "model" in ckpter.recoverables
    ckpts = list(save.glob("CKPT+*"))
    assert ckpts and all(ckpter.check_checkpoint_dir(d) is None for d in ckpts), seed
    metas = [yaml.safe_load((d / "CKPT.yaml").read_text()) for d in ckpts]
    assert max(m.get("epoch", 0) for m in metas) == 3, (seed, metas)
    assert sum("WER" not in m for m in metas) <= 1, (seed, metas)  # intra-epoch: latest only
    assert not [p for p in save.iterdir() if p.name.startswith(".CKPT")], seed


def test_beam_search_decodes_what_greedy_cannot(tmp_path: Path) -> None:
    """The recipe's "beam" decoding is SpeechBrain's CTC prefix beam search: over 3 frames of
    blank 0.6 / A 0.4 the best path is all blanks (greedy: no word), while the label sequence
    "A", summed over its alignments, has probability 0.688 against 0.216."""
    argv = [str(CTC / "demo.yaml"), "--data_folder", str(tmp_path), "--output_folder",
            str(tmp_path / "out")]
    _, hparams, run_opts, _ = load_config(argv, train_CTC.KEYS)
    brain = train_CTC.build_brain(hparams, run_opts, None)
    probs = torch.full((1, 3, hparams["output_neurons"]), 1e-9)
    probs[..., hparams["blank_index"]] = 0.6
    probs[..., brain.tokenizer.lab2ind["A"]] = 0.4
    log_probs, lens = (probs / probs.sum(-1, keepdim=True)).log(), torch.ones(1)
    assert brain._decode(log_probs, lens, "greedy") == [[]]
    assert brain._decode(log_probs, lens, "beam") == [["A"]]


@pytest.mark.slow
def test_bf16_accumulation_and_beam_search(demo_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """bf16 autocast on CPU, 2 batches per optimizer step; ``--test_search beam`` decodes the
    test sets, and only them, with the CTC prefix beam search. The run is in this process so
    that the decoders can be counted: after a minute of training both searches emit no words,
    so the WER files cannot tell them apart (test_beam_search_decodes_what_greedy_cannot)."""
    decoded = {"beam": 0, "greedy": 0}
    real_beam, real_greedy = CTCPrefixBeamSearcher.__call__, sb.decoders.ctc_greedy_decode

    def beam(self, log_probs, *args, **kwargs):
        decoded["beam"] += len(log_probs)
        return real_beam(self, log_probs, *args, **kwargs)

    def greedy(log_probs, *args, **kwargs):
        decoded["greedy"] += len(log_probs)
        return real_greedy(log_probs, *args, **kwargs)

    monkeypatch.setattr(CTCPrefixBeamSearcher, "__call__", beam)
    monkeypatch.setattr(sb.decoders, "ctc_greedy_decode", greedy)
    out = tmp_path / "run"
    train_CTC.main([
        str(CTC / "demo.yaml"), "--data_folder", str(demo_corpus), "--output_folder", str(out),
        "--select_n_sentences", "[64, 16, 16, 16]", "--number_of_epochs", "1", "--noprogressbar",
        "--precision", "bf16", "--grad_accumulation_factor", "2", "--test_search", "beam",
    ])
    n_batches = train_batches(_load("demo", demo_corpus, output_folder=str(out)))
    log = read_train_log(out / "train_log.txt")
    assert log.loc[1, "steps"] == n_batches // 2  # one optimizer step per 2 batches
    assert math.isfinite(log.loc[1, "train loss"]) and log.loc[1, "skipped_steps"] == 0
    # Validation (16 utterances) decoded greedily; test-clean and test-other (16 each) by beam.
    assert decoded == {"greedy": 16, "beam": 32}
    tests = read_test_lines(out / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"]
    assert read_wer_file(out / "wer_test-clean.txt")["sentences"] == 16
