"""Fine-tuning (mamba_asr.finetune): init_from each source kind gives the source's outputs
before the first step; init_skip, a new vocabulary and the mismatch errors; freeze and
unfreeze_after_epochs; a killed fine-tuning run resumes from its own checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch
import yaml
from conftest import DEMO_DATA, REPO, logged_epochs
from runs import CTC_DEMO, ENV, S2S_DEMO
from speechbrain.inference.ASR import EncoderASR
from speechbrain.processing.features import InputNormalization

import train_CTC
import train_S2S
from mamba_asr import data
from mamba_asr.checkpoints import KILL_ENV
from mamba_asr.config import ConfigError, load_config, start_run
from mamba_asr.finetune import matches, select
from mamba_asr.resume import checkpoint_from_dir
from mamba_asr.trained import LATER_KEYS, load_trained

SEED = "1"  # not the demo's: a fresh model differs from every source


def _brain(tmp_path: Path, *extra: str, recipe=train_CTC, config: Path = CTC_DEMO,
           seed: str = SEED):
    """The recipe's brain of ``config`` (+ ``extra``) with its output in ``tmp_path``."""
    argv = [str(config), "--data_folder", str(DEMO_DATA), "--output_folder",
            str(tmp_path / "ft"), "--seed", seed, *extra]
    _, hparams, run_opts, _ = load_config(argv, recipe.KEYS, write_output=False)
    return recipe.build_brain(hparams, run_opts, hparams["checkpointer"]), hparams


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch(brain, hparams: dict, csv: Path):
    """The first 4 utterances (shortest first) of ``csv``."""
    dataset = data.evaluation_set(csv, str(DEMO_DATA))
    train_CTC.add_pipelines(hparams, brain.tokenizer, None, [dataset])
    return next(iter(sb.dataio.dataloader.make_dataloader(dataset, batch_size=4)))


def _log_probs(brain, batch) -> torch.Tensor:
    """CTC log-probabilities (B, T', outputs) of the recipe's forward pass."""
    brain.modules.eval()
    with torch.no_grad():
        return brain.compute_forward(batch, sb.Stage.VALID)[0]


# --------------------------------------------------------------------------- name patterns


def test_patterns_match_components() -> None:
    assert matches("ctc_lin", "ctc_lin.w.weight")
    assert not matches("ctc_lin", "ctc_linear.w.weight")
    assert matches("Transformer.encoder.layers.0-5", "Transformer.encoder.layers.5.mamba.A_log")
    assert not matches("Transformer.encoder.layers.0-5", "Transformer.encoder.layers.6.norm.w")
    assert not matches("Transformer.encoder.layers.0-5", "Transformer.encoder.layers")
    assert matches("*.norm", "Transformer.norm.norm.weight")
    assert not matches("*.norm", "Transformer.encoder.norm1.weight")
    assert matches("CNN.convblock_*", "CNN.convblock_1.conv.w")
    names = ["CNN.a.w", "Transformer.norm.w", "ctc_lin.w.weight"]
    assert select(["ctc_lin", "*.norm"], names, "init_skip") == {names[1], names[2]}
    with pytest.raises(ConfigError, match=r"init_skip: pattern 'seq_lin' matches no parameter "
                                          r"\(names look like CNN.a, Transformer.norm"):
        select(["ctc_lin", "seq_lin"], names, "init_skip")


# --------------------------------------------------------------------------- init_skip


def test_init_skip_new_vocabulary_and_mismatch_errors(tmp_path: Path) -> None:
    """A model with 30 outputs (no apostrophe) from a 31-output source: ctc_lin stays at the
    fresh initialisation of its seed, the rest is the source's; without init_skip one line
    names the parameter and both shapes; a model tensor the source lacks, or a pattern that
    matches nothing, is an error too."""
    source, _ = _brain(tmp_path / "src", seed="5")
    ckpt = tmp_path / "src" / "model.ckpt"
    torch.save(source.hparams.model.state_dict(), ckpt)
    new_vocab = ["--characters", "\" ABCDEFGHIJKLMNOPQRSTUVWXYZ\"", "--output_neurons", "30"]
    fresh = _state(_brain(tmp_path / "fresh", *new_vocab)[0].hparams.model)
    brain, _ = _brain(tmp_path, *new_vocab, "--init_from", str(ckpt), "--init_skip", "[ctc_lin]")
    brain.init_from_source()
    loaded, theirs = _state(brain.hparams.model), source.hparams.model.state_dict()
    assert loaded.keys() == fresh.keys() == theirs.keys()
    for key, value in loaded.items():
        expected = fresh[key] if key.startswith("2.") else theirs[key]  # 2: ctc_lin
        assert torch.equal(value, expected), key
    assert sum(not torch.equal(fresh[k], theirs[k]) for k in fresh if k[0] != "2") > 20

    assert brain.modules.normalize.count == 0  # fresh statistics
    brain, _ = _brain(tmp_path / "b", *new_vocab, "--init_from", str(ckpt))
    with pytest.raises(ConfigError) as info:
        brain.init_from_source()
    assert "\n" not in str(info.value)
    assert ("ctc_lin.w.weight: (31, 144) in the source, (30, 144) here; "
            "ctc_lin.w.bias: (31) in the source, (30) here; add them to init_skip"
            in str(info.value))
    state = dict(theirs)
    del state["1.encoder.norm.norm.weight"]
    state["3.extra"] = torch.zeros(2)
    torch.save(state, ckpt)
    brain, _ = _brain(tmp_path / "c", "--init_from", str(ckpt))
    with pytest.raises(ConfigError, match=r"Transformer.encoder.norm.norm.weight: missing in the "
                                          r"source, \(144\) here; 3.extra: not in this model"):
        brain.init_from_source()
    brain, _ = _brain(tmp_path / "d", "--init_from", str(ckpt), "--init_skip", "[ctc]")
    with pytest.raises(ConfigError, match="init_skip: pattern 'ctc' matches no parameter"):
        brain.init_from_source()


def test_unusable_sources_are_one_line_errors(tmp_path: Path) -> None:
    """A missing path, a folder holding no model, a truncated model.ckpt in a checkpoint
    folder: one ConfigError line naming the path."""
    source, _ = _brain(tmp_path / "src", seed="5")
    ckpt = tmp_path / "save" / "CKPT+2026-01-01+00-00-00+00"
    ckpt.mkdir(parents=True)
    torch.save(source.hparams.model.state_dict(), ckpt / "model.ckpt")
    (ckpt / "CKPT.yaml").write_text("end-of-epoch: true\nunixtime: 1.0\nepoch: 1\n")
    brain, _ = _brain(tmp_path, "--init_from", str(ckpt))
    brain.init_from_source()  # complete
    data = (ckpt / "model.ckpt").read_bytes()
    (ckpt / "model.ckpt").write_bytes(data[: len(data) // 2])
    errors = {
        ckpt: r"CKPT\+2026-01-01\+00-00-00\+00: the checkpoint is incomplete: model.ckpt",
        tmp_path / "nowhere": r"nowhere: no such file or folder; expected an export folder",
        tmp_path / "src": r"src: holds no model; expected an export folder",
    }
    for path, message in errors.items():
        brain.hparams.init_from = str(path)
        with pytest.raises(ConfigError, match=rf"^init_from .*{message}[^\n]*$"):
            brain.init_from_source()


def test_init_normalizer_loads_the_source_statistics(tmp_path: Path) -> None:
    """init_normalizer: the statistics of the normalizer.ckpt beside the source's weights, as
    SpeechBrain's checkpointer loads them; an error when the source has none."""
    source, _ = _brain(tmp_path / "src", seed="5")
    folder = tmp_path / "src"
    torch.save(source.hparams.model.state_dict(), folder / "model.ckpt")
    norm = InputNormalization(norm_type="global")
    norm(torch.randn(3, 50, 40) * 2 + 1, torch.ones(3))
    norm._save(folder / "normalizer.ckpt")
    brain, _ = _brain(tmp_path, "--init_from", str(folder / "model.ckpt"), "--init_normalizer",
                      "True")
    brain.init_from_source()
    assert brain.modules.normalize.count == norm.count > 0
    assert torch.equal(brain.modules.normalize.glob_mean, norm.glob_mean)
    (folder / "normalizer.ckpt").unlink()
    brain, _ = _brain(tmp_path / "b", "--init_from", str(folder / "model.ckpt"),
                      "--init_normalizer", "True")
    with pytest.raises(ConfigError, match=r"init_normalizer: True, but init_from .*model.ckpt "
                                          r"has no normalizer.ckpt"):
        brain.init_from_source()


def test_other_token_map_needs_new_output_layers(tmp_path: Path) -> None:
    """An export of the demo model whose character map is not this run's (Y and Z swapped:
    same shapes) loads only with the output layer in init_skip."""
    source, hparams = _brain(tmp_path / "src", seed="5")
    folder = tmp_path / "export"
    folder.mkdir()
    torch.save(source.hparams.model.state_dict(), folder / "asr.ckpt")
    shutil.copyfile(hparams["tokenizer_file"], folder / "tokenizer.ckpt")
    swapped = ["--characters", "\" 'ABCDEFGHIJKLMNOPQRSTUVWXZY\""]
    brain, theirs = _brain(tmp_path / "a", *swapped, "--init_from", str(folder))
    with pytest.raises(ConfigError, match=r"export/tokenizer.ckpt differs from this run's "
                                          r".*label_encoder.txt, but ctc_lin would keep"):
        brain.init_from_source()
    brain, _ = _brain(tmp_path / "b", *swapped, "--init_from", str(folder), "--init_skip",
                      "[ctc_lin]")
    brain.init_from_source()
    brain, _ = _brain(tmp_path / "c", "--init_from", str(folder))  # the same map
    brain.init_from_source()
    assert torch.equal(brain.hparams.model[2].w.weight, source.hparams.model[2].w.weight)


# --------------------------------------------------------------------------- freezing


def _fit(tmp_path: Path, *extra: str):
    """An in-process demo run on 8 utterances (main without its test stage); its brain."""
    argv = [str(CTC_DEMO), "--data_folder", str(DEMO_DATA), "--output_folder",
            str(tmp_path / "run"), "--select_n_sentences", "[8, 4, 4, 4]", "--noprogressbar",
            "--seed", SEED, "--num_workers", "0", "--max_batch_length_val", "10", *extra]
    hparams, run_opts = start_run(argv, train_CTC.KEYS)
    brain = train_CTC.build_brain(hparams, run_opts, hparams["checkpointer"])
    train, valid, _ = data.dataio_prepare(hparams, brain.tokenizer, train_CTC.add_pipelines)
    train_opts, valid_opts = data.loader_options(hparams, train, valid)
    before = _state(brain.modules)
    brain.fit(hparams["epoch_counter"], train, valid, train_loader_kwargs=train_opts,
              valid_loader_kwargs=valid_opts)
    return brain, before


def test_frozen_parameters_stay_and_have_no_optimizer_state(tmp_path: Path) -> None:
    """One epoch with the front-end and the first encoder layer frozen: they are bit-identical
    and have no AdamW state, every other tensor changed; rerun with 2 epochs and
    unfreeze_after_epochs 1 (resuming past it) they train too."""
    freeze = ["--freeze", "[CNN, Transformer.encoder.layers.0-0]"]
    brain, before = _fit(tmp_path, *freeze, "--number_of_epochs", "1",
                         "--unfreeze_after_epochs", "1")
    params = dict(brain.modules.named_parameters())
    frozen = {n for n in params if n.startswith(("CNN.", "Transformer.encoder.layers.0."))}
    assert len(frozen) > 10 and set(brain.frozen) == frozen
    for name, param in params.items():
        assert torch.equal(param, before[name]) == (name in frozen), name
        assert (param in brain.optimizer.state) == (name not in frozen), name
    assert not any(p.requires_grad for n, p in params.items() if n in frozen)

    brain, after_one = _fit(tmp_path, *freeze, "--number_of_epochs", "2",
                            "--unfreeze_after_epochs", "1")
    assert brain.frozen == {}
    for name, param in brain.modules.named_parameters():
        assert param.requires_grad and param in brain.optimizer.state, name
        assert not torch.equal(param, after_one[name]), name


# --------------------------------------------------------------------------- source kinds


def _upstream_layout(run: Path, folder: Path) -> Path:
    """The run's checkpoints laid out as xi-j/Mamba-ASR's CTC recipe saves them: CKPT.yaml
    metas WER and epoch only, no file of ours beside the save folder."""
    save = folder / "save"
    for i, ckpt in enumerate(sorted((run / "save").glob("CKPT+*"))):
        meta = yaml.safe_load((ckpt / "CKPT.yaml").read_text())
        out = save / f"CKPT+2024-01-0{i + 1}+00-00-00+00"
        out.mkdir(parents=True)
        for file in ckpt.glob("*.ckpt"):  # model, normalizer, noam_scheduler, counter, ...
            shutil.copyfile(file, out / file.name)
        upstream = {"WER": meta["WER"], "epoch": meta["epoch"], "end-of-epoch": True,
                    "unixtime": 1704067200.0 + i}
        (out / "CKPT.yaml").write_text(yaml.safe_dump(upstream))
    return save


@pytest.mark.slow
def test_init_from_each_source_kind_gives_its_outputs(
    ctc_run: Path, ctc_export: Path, tmp_path: Path
) -> None:
    """Before the first step, a model initialised from a run folder, a CKPT+... folder, an
    upstream-layout save folder, a bare model.ckpt and an export folder gives the CTC
    log-probabilities of the source as evaluate.py (load_trained) or SpeechBrain's EncoderASR
    load it; the fresh model does not."""
    ckpts = sorted((ctc_run / "save").glob("CKPT+*"))
    assert len(ckpts) == 2
    bare = tmp_path / "bare" / "model.ckpt"
    bare.parent.mkdir()
    shutil.copyfile(ckpts[0] / "model.ckpt", bare)
    upstream = _upstream_layout(ctc_run, tmp_path / "upstream")
    csv = ctc_run / "prepared" / "test-clean.csv"
    brain, hparams = _brain(tmp_path / "ft")
    batch = _batch(brain, hparams, csv)
    fresh_out = _log_probs(brain, batch)

    # evaluate.py's loading: the run's configuration and the checkpoints named (averaged)
    model = load_trained(str(ctc_run / "hyperparams.yaml"), [str(ctc_run / "save")],
                         ["--data_folder", str(DEMO_DATA)])

    model.load_weights()  # the best checkpoints of the save folder, as its test stage chose
    run_out = _log_probs(model.brain, batch)

    def evaluated(ckpt: list[Path]) -> torch.Tensor:
        ckpter = model.brain.checkpointer
        model.brain.eval_checkpoints = [checkpoint_from_dir(c, ckpter) for c in ckpt]
        model.load_weights()
        return _log_probs(model.brain, batch)

    expected = {
        ctc_run: run_out, ckpts[1]: evaluated([ckpts[1]]),
        upstream.parent: evaluated(sorted(upstream.glob("CKPT+*"))), bare: evaluated([ckpts[0]]),
    }
    assert not torch.allclose(expected[ckpts[1]], expected[ctc_run], atol=1e-4)  # 2 averaged
    asr = EncoderASR.from_hparams(source=str(ctc_export), savedir=str(ctc_export))
    with torch.no_grad():
        expected[ctc_export] = asr.encode_batch(*batch.sig)
    for source, reference in expected.items():
        assert not torch.allclose(fresh_out, reference, atol=1e-3), source
        brain.hparams.init_from = str(source)
        brain.init_from_source()
        got = _log_probs(brain, batch)
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0, msg=str(source))

    # A run older than the fine-tuning keys and max_skipped_fraction evaluates as before.
    lines = (ctc_run / "hyperparams.yaml").read_text().splitlines(keepends=True)
    old = tmp_path / "old.yaml"
    old.write_text("".join(x for x in lines if not x.startswith(tuple(LATER_KEYS))))
    assert "init_from" not in old.read_text() and "max_skipped" not in old.read_text()
    model = load_trained(str(old), [str(ctc_run / "save")], ["--data_folder", str(DEMO_DATA)],
                         recipe="CTC")
    model.load_weights()
    assert torch.equal(_log_probs(model.brain, batch), expected[ctc_run])


@pytest.mark.slow
def test_s2s_init_from_a_run(s2s_run: dict, tmp_path: Path) -> None:
    """An S2S model initialised from an S2S run folder holds the weights evaluate.py averages
    from it (encoder, decoder and both output layers)."""
    out = s2s_run["out"]
    model = load_trained(str(out / "hyperparams.yaml"), [str(out / "save")], [])
    model.load_weights()
    expected = model.hparams["model"].state_dict()
    args = s2s_run["args"][s2s_run["args"].index("--select_n_sentences"):]
    brain, _ = _brain(tmp_path, *args, "--init_from", str(out), recipe=train_S2S, config=S2S_DEMO)
    assert not torch.equal(brain.hparams.model.state_dict()["3.w.weight"], expected["3.w.weight"])
    brain.init_from_source()
    got = brain.hparams.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key


# --------------------------------------------------------------------------- resuming


@pytest.mark.slow
def test_killed_finetuning_resumes_from_its_own_checkpoint(ctc_run: Path, tmp_path: Path) -> None:
    """A fine-tuning run killed inside its second checkpoint save, rerun with the same command,
    resumes from its epoch-1 checkpoint (not from init_from) and finishes."""
    out = tmp_path / "ft"
    argv = [str(CTC_DEMO), "--data_folder", str(DEMO_DATA), "--output_folder", str(out),
            "--select_n_sentences", "[8, 4, 4, 4]", "--number_of_epochs", "2",
            "--init_from", str(ctc_run), "--init_skip", "[ctc_lin]", "--noprogressbar"]
    cmd = [sys.executable, "train_CTC.py", *argv]
    killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env={**ENV, KILL_ENV: "2:1"}, timeout=600)
    assert killed.returncode != 0
    log = (out / "log.txt").read_text()
    assert "init_from run folder" in log and "2 checkpoint(s) averaged" in log
    (ckpt,) = out.glob("save/CKPT+*")
    assert yaml.safe_load((ckpt / "CKPT.yaml").read_text())["epoch"] == 1

    # In process, what the rerun does before its first step: the epoch-1 weights.
    _, hparams, run_opts, _ = load_config(argv, train_CTC.KEYS, write_output=False)
    brain = train_CTC.build_brain(hparams, run_opts, hparams["checkpointer"])
    brain.on_fit_start()
    own = torch.load(ckpt / "model.ckpt")
    source = torch.load(next((ctc_run / "save").glob("CKPT+*")) / "model.ckpt")
    state = brain.hparams.model.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in own)
    assert not torch.equal(state["1.encoder.norm.norm.weight"],
                           source["1.encoder.norm.norm.weight"])

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rerun = (out / "log.txt").read_text()[len(log):]
    assert f"init_from {ctc_run} ignored: this run resumes from {ckpt}" in rerun
    assert "tensors loaded" not in rerun
    assert logged_epochs(out / "train_log.txt") == [1, 2, 2]
