"""Tokenizer (mamba_asr.tokenizer), local-only pretrained loading (mamba_asr.pretrained) and the
LM recipe (train_LM.py + hparams/LM/) on the demo corpus."""

from __future__ import annotations

import csv
import inspect
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import speechbrain as sb
import torch
from config_keys import assert_declared_keys_present, assert_every_key_used, keys_read
from conftest import REPO, logged_epochs
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.parameter_transfer import Pretrainer

import train_LM
from librispeech_prepare import prepare_librispeech
from mamba_asr import data, text_data
from mamba_asr.brain import TRAINING_KEYS, TrainingBrain
from mamba_asr.config import start_run
from mamba_asr.pretrained import (
    PretrainedError,
    load_lm_folder,
    load_pretrained,
    load_pretrainer,
    load_state_dict_strict,
)
from mamba_asr.reports.curves import read_test_lines, read_train_log
from mamba_asr.resume import RESUME_MARKER
from mamba_asr.tokenizer import TokenizerError, load_tokenizer, prepare_tokenizer, read_sentences

LM = REPO / "hparams" / "LM"
LM_CONFIGS = sorted(p.stem for p in LM.glob("*.yaml"))
LM_SCRIPTS = [
    REPO / "train_LM.py", REPO / "mamba_asr" / "text_data.py", REPO / "mamba_asr" / "data.py",
    REPO / "mamba_asr" / "brain.py",
    REPO / "mamba_asr" / "config.py",
]
HUB = "speechbrain/asr-transformer-transformerlm-librispeech"


@pytest.fixture(scope="module")
def manifests(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus' manifests (train.csv, dev-clean.csv, test-*.csv) in a temporary folder."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_librispeech(
        demo_corpus,
        out,
        tr_splits=["train-clean-100"],
        dev_splits=["dev-clean"],
        te_splits=["test-clean", "test-other"],
        merge_lst=["train-clean-100"],
        merge_name="train.csv",
        data_root_placeholder=True,
    )
    return out


@pytest.fixture(scope="module")
def demo_tokenizer(manifests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128-piece tokenizer trained on the demo transcripts (its .model path)."""
    folder = tmp_path_factory.mktemp("tok")
    prepare_tokenizer(folder, 128, manifests / "train.csv")
    return folder / "128_unigram.model"


def first_sentence(csv_path: Path) -> str:
    with open(csv_path, newline="") as f:
        return next(csv.DictReader(f))["wrd"]


def tiny_lm(vocab: int = 128, d_model: int = 32, layers: int = 2) -> TransformerLM:
    return TransformerLM(
        vocab, d_model, 4, layers, 0, 64, dropout=0.0, activation=torch.nn.GELU
    ).eval()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_trains_reloads_and_is_idempotent(manifests: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    sp = prepare_tokenizer(folder, 200, manifests / "train.csv")
    model = folder / "200_unigram.model"
    assert model.is_file() and (folder / "200_unigram.json").is_file()
    assert not (folder / "200_unigram.txt").exists()  # the extracted text is not left behind
    # SpeechBrain's LibriSpeech settings: unk 0 (= CTC blank and padding), bos 1, eos 2, no pad
    assert (sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (
        200,
        0,
        1,
        2,
        -1,
    )

    sentence = first_sentence(manifests / "dev-clean.csv")  # held out from training
    ids = sp.encode_as_ids(sentence)
    assert sp.decode_ids(ids) == sentence and 0 not in ids
    shutil.copy(model, tmp_path / "tokenizer.ckpt")
    for path in (model, tmp_path / "tokenizer.ckpt", tmp_path):  # file, .ckpt, folder
        reloaded = load_tokenizer(path, vocab_size=200, bos_id=1, eos_id=2)
        assert reloaded.encode_as_ids(sentence) == ids
        assert reloaded.decode_ids(ids) == sentence

    mtime = model.stat().st_mtime_ns
    again = prepare_tokenizer(folder, 200, manifests / "train.csv")
    assert model.stat().st_mtime_ns == mtime  # same options, same text: not retrained
    assert again.encode_as_ids(sentence) == ids

    prepare_tokenizer(folder, 200, manifests / "train.csv", character_coverage=0.9999)
    assert model.stat().st_mtime_ns != mtime  # other options: retrained
    mtime = model.stat().st_mtime_ns
    rows = (manifests / "train.csv").read_text().splitlines()
    (tmp_path / "half.csv").write_text("\n".join(rows[: len(rows) // 2]) + "\n")
    prepare_tokenizer(folder, 200, tmp_path / "half.csv", character_coverage=0.9999)
    assert model.stat().st_mtime_ns != mtime  # other text: retrained


def test_tokenizer_errors_name_the_file(
    manifests: Path, demo_tokenizer: Path, tmp_path: Path
) -> None:
    with pytest.raises(TokenizerError, match=r"manifest .*nope\.csv does not exist: prepare it"):
        prepare_tokenizer(tmp_path / "t", 100, tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("ID,duration,wav,spk_id,text\na,1.0,x.flac,s,HELLO\n")
    with pytest.raises(TokenizerError, match=r"bad\.csv has no column 'wrd'.*ID, duration"):
        prepare_tokenizer(tmp_path / "t", 100, tmp_path / "bad.csv")
    with pytest.raises(TokenizerError, match="Vocabulary size too high"):
        prepare_tokenizer(tmp_path / "t", 100_000, manifests / "train.csv")
    with pytest.raises(PretrainedError, match=r"tokenizer file tokenizer\.ckpt is missing from"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"it has vocab_size 128 \(expected 5000\)"):
        load_tokenizer(demo_tokenizer, vocab_size=5000)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


# --------------------------------------------------------------------------- pretrained


def test_missing_files_and_hub_ids_fail_without_downloading(
    demo_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    folder = tmp_path / "pretrained"
    folder.mkdir()
    shutil.copy(demo_tokenizer, folder / "tokenizer.ckpt")
    lm, tok = tiny_lm(), spm.SentencePieceProcessor()
    with pytest.raises(PretrainedError) as err:
        load_pretrained(lm, tok, source=folder)
    msg = str(err.value)
    assert f"lm file lm.ckpt is missing from {folder} (the folder holds: tokenizer.ckpt)" in msg
    assert "python train_LM.py hparams/LM/transformer.yaml" in msg
    assert "from a machine with internet" in msg

    with pytest.raises(PretrainedError, match="looks like a HuggingFace hub id.*never downloads"):
        load_pretrained(lm, tok, source=HUB)
    # A Pretrainer declared as upstream's S2S YAML does, pointing at the hub id.
    pretrainer = Pretrainer(
        collect_in=tmp_path / "save",
        loadables={"lm": lm, "tokenizer": tok},
        paths={"lm": f"{HUB}/lm.ckpt", "tokenizer": f"{HUB}/tokenizer.ckpt"},
    )
    with pytest.raises(PretrainedError, match=rf"lm file {HUB}/lm\.ckpt not found.*hub id"):
        load_pretrainer(pretrainer)
    with pytest.raises(PretrainedError, match="is a URL; this recipe never downloads"):
        load_pretrained(
            lm, tok, lm_path="https://example.com/lm.ckpt", tokenizer_path=folder / "tokenizer.ckpt"
        )


def test_architecture_mismatch_is_an_error_not_a_partial_load(
    demo_tokenizer: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    torch.save(tiny_lm(d_model=32).state_dict(), tmp_path / "lm.ckpt")
    shutil.copy(demo_tokenizer, tmp_path / "tokenizer.ckpt")

    wide = tiny_lm(d_model=48)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(PretrainedError) as err:
        load_pretrained(wide, spm.SentencePieceProcessor(), source=tmp_path)
    msg = str(err.value)
    assert "the file holds vocab 128, d_model 32, 2 layers, d_ffn 64" in msg
    assert "the config builds vocab 128, d_model 48, 2 layers, d_ffn 64" in msg
    assert "nothing was loaded" in msg
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())

    with pytest.raises(
        PretrainedError,
        match=r"file holds vocab 128, d_model 32, 2 layers.*"
        r"config builds vocab 128, d_model 32, 3 layers",
    ):
        load_pretrained(tiny_lm(layers=3), source=tmp_path)
    torch.save(tiny_lm(vocab=100).state_dict(), tmp_path / "lm.ckpt")
    with pytest.raises(PretrainedError, match="has 128 pieces but the LM 'lm' has a 100-token"):
        load_pretrained(tiny_lm(vocab=100), spm.SentencePieceProcessor(), source=tmp_path)


def test_missing_positional_buffer_is_rebuilt(tmp_path: Path) -> None:
    """Old checkpoints may lack the sinusoidal ``pe`` buffer: it is computed, not learned."""
    src = tiny_lm()
    state = {k: v for k, v in src.state_dict().items() if k != "positional_encoding.pe"}
    torch.save(state, tmp_path / "lm.ckpt")
    dst = tiny_lm()
    load_state_dict_strict(dst, tmp_path / "lm.ckpt")
    x = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(src(x), dst(x))


# --------------------------------------------------------------------------- train_LM pieces


def test_text_corpus_reads_lines_lazily(demo_tokenizer: Path, tmp_path: Path) -> None:
    text = tmp_path / "lm.txt"
    text.write_bytes(b"HELLO WORLD\n\nthe  cat sat\r\n" + b"X" * 50 + b"\nNO FINAL NEWLINE")
    sp = load_tokenizer(demo_tokenizer)
    corpus = text_data.TextCorpus(sp, ["A B", ""], [text], max_chars=40)
    assert [corpus.text(i) for i in range(len(corpus))] == [
        "A B",
        "HELLO WORLD",
        "THE CAT SAT",
        "NO FINAL NEWLINE",
    ]
    item = corpus[2]
    ids = sp.encode_as_ids("THE CAT SAT")
    assert item["tokens_bos"].tolist() == [1, *ids] and item["tokens_eos"].tolist() == [*ids, 2]
    assert item["n_words"] == 3


def test_bucket_batch_sampler() -> None:
    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    sampler = text_data.BucketBatchSampler(
        lengths, max_batch_length=800, num_buckets=10, max_batch_ex=16, seed=3
    )
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(1000))
    assert all(len(b) <= 16 and len(b) * lengths[b].max() <= 800 for b in epoch0)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and len(list(sampler)) == len(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # deterministic: an intra-epoch checkpoint resumes exactly


def test_every_yaml_key_is_used() -> None:
    assert_every_key_used(LM, LM_CONFIGS, LM_SCRIPTS)


def test_transformer_yaml_builds_speechbrain_librispeech_lm(tmp_path: Path) -> None:
    with open(REPO / "hparams" / "LM" / "transformer.yaml") as f:
        hparams = load_hyperpyyaml(
            f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out")}
        )
    model = hparams["model"]
    vocab, d, heads, layers, ffn = 5000, 768, 12, 12, 3072
    attention = (3 * d * d + 3 * d) + (d * d + d)  # in_proj, out_proj
    feed_forward = (d * ffn + ffn) + (ffn * d + d)
    per_layer = attention + feed_forward + 2 * (2 * d)  # + norm1, norm2
    output = (d * d + d) + 2 * d + (d * vocab + vocab)  # Linear, LayerNorm, Linear
    expected = vocab * d + layers * per_layer + 2 * d + output  # embedding, layers, final norm
    assert expected == 93_333_128
    assert sum(p.numel() for p in model.parameters()) == expected
    layer = model.encoder.layers[0]
    assert len(model.encoder.layers) == layers and layer.self_att.att.num_heads == heads
    assert isinstance(layer.pos_ffn.ffn[1], torch.nn.GELU) and not layer.normalize_before
    assert train_LM.lm_arch(hparams) == {
        "vocab": 5000,
        "d_model": 768,
        "nhead": 12,
        "num_encoder_layers": 12,
        "num_decoder_layers": 0,
        "d_ffn": 3072,
        "dropout": 0.0,
        "activation": torch.nn.GELU,
        "normalize_before": False,
    }
    assert (hparams["bos_index"], hparams["eos_index"]) == (1, 2)


# --------------------------------------------------------------------------- the recipe


def run_train_lm(
    out: Path, manifests: Path, *overrides: str, script: str | Path = "train_LM.py"
) -> subprocess.CompletedProcess:
    """``script`` (train_LM.py or a wrapper of its ``main``) on demo.yaml and the manifests."""
    cmd = [
        sys.executable,
        str(script),
        "hparams/LM/demo.yaml",
        "--output_folder",
        str(out),
        "--prep_folder",
        str(manifests),
        "--skip_prep",
        "True",
        "--noprogressbar",
        "--device",
        "cpu",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_demo_lm_trains_resumes_and_exports(manifests: Path, tmp_path: Path) -> None:
    """Two epochs of demo.yaml in two runs (the second resumes), then the export."""
    out = tmp_path / "lm"
    run_train_lm(out, manifests, "--number_of_epochs", "1")
    run_train_lm(out, manifests, "--number_of_epochs", "2")  # resumes after epoch 1
    log = read_train_log(out / "train_log.txt")
    assert logged_epochs(out / "train_log.txt") == [1, 2]  # no epoch trained twice
    assert list(log["skipped_steps"]) == [0, 0]
    assert log["steps"].loc[2] == 2 * log["steps"].loc[1]  # steps carry over the restart
    # the LM's throughput is in tokens (no audio); the monitor's other fields as in ASR
    assert (log["tokens_per_s"] > 0).all() and "audio_s_per_s" not in log
    assert (log["tokens_per_s_total"] == log["tokens_per_s"]).all()
    assert (log["grad_norm_max"] >= log["grad_norm_mean"]).all()
    assert list(log["eta"])[-1] == "0:00:00"
    ppl = log["valid ppl"]
    first, second = ppl.loc[1], ppl.loc[2]
    assert first < 128  # half of a uniform distribution over the 256 pieces
    assert second < 0.75 * first  # measured: 28.9 -> 18.6
    assert np.allclose(np.log(ppl), log["valid loss"], rtol=0.02)
    tests = read_test_lines(out / "train_log.txt")
    assert list(tests["test set"]) == ["test-clean", "test-other"] * 2
    assert list(tests["Epoch loaded"]) == [1, 1, 2, 2]
    assert (tests["test ppl"].iloc[-2:] < first).all()

    export = out / "export"
    assert sorted(p.name for p in export.iterdir()) == [
        "hyperparams.yaml",
        "lm.ckpt",
        "tokenizer.ckpt",
    ]
    lm, tokenizer, lm_hparams = load_lm_folder(export)
    assert (lm_hparams["vocab"], lm_hparams["d_model"], lm_hparams["num_encoder_layers"]) == (
        256,
        128,
        2,
    )
    assert lm_hparams["valid_ppl"] == pytest.approx(ppl.min(), rel=0.01)

    # The best checkpoint's weights, loaded strictly into the demo config's own model ...
    with open(REPO / "hparams" / "LM" / "demo.yaml") as f:
        demo = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "fresh")})
    reference = demo["model"].eval()
    best = Checkpointer(out / "save").find_checkpoint(min_key="loss")
    reference.load_state_dict(torch.load(best.path / "model.ckpt"), strict=True)
    # ... equal the export loaded by load_lm_folder and by an upstream-style YAML Pretrainer
    # (whose collect_in holds a stale link that must not be reused).
    fresh, fresh_tok = TransformerLM(**train_LM.lm_arch(demo)).eval(), spm.SentencePieceProcessor()
    (tmp_path / "collect").mkdir()
    (tmp_path / "collect" / "lm.ckpt").symlink_to(tmp_path / "elsewhere.ckpt")
    torch.save(tiny_lm().state_dict(), tmp_path / "elsewhere.ckpt")
    load_pretrainer(
        Pretrainer(
            collect_in=tmp_path / "collect",
            loadables={"lm": fresh, "tokenizer": fresh_tok},
            paths={"lm": f"{export}/lm.ckpt", "tokenizer": f"{export}/tokenizer.ckpt"},
        )
    )
    sentence = first_sentence(manifests / "test-clean.csv")
    ids = torch.tensor([[1, *tokenizer.encode_as_ids(sentence)]])
    assert fresh_tok.encode_as_ids(sentence) == tokenizer.encode_as_ids(sentence)
    with torch.no_grad():
        expected = reference(ids)
        assert torch.equal(lm(ids), expected) and torch.equal(fresh(ids), expected)
    assert math.isfinite(float(expected.sum()))

    # Heads cannot be seen in the weights: the exported hyperparams.yaml catches them.
    eight_heads = TransformerLM(**{**train_LM.lm_arch(demo), "nhead": 8})
    with pytest.raises(PretrainedError, match=r"trained with nhead 4 \(config: 8\)"):
        load_pretrained(eight_heads, source=export)


@pytest.mark.slow
def test_demo_config_as_shipped(manifests: Path, tmp_path: Path) -> None:
    """The first 6 of the 12 epochs of demo.yaml (its learning rate follows the step, not the
    number of epochs: these are the shipped run's first 6; ``make demo-s2s`` trains all 12).
    Measured valid perplexity 28.9 after epoch 1, 11.3 after epoch 6 (8.54 after 12), test
    perplexity 11.0."""
    out = tmp_path / "lm"
    run_train_lm(out, manifests, "--number_of_epochs", "6")
    ppl = read_train_log(out / "train_log.txt")["valid ppl"]
    assert len(ppl) == 6 and ppl.iloc[0] < 30
    assert ppl.iloc[-1] < 12 and ppl.iloc[-1] < 0.4 * ppl.iloc[0]
    assert (read_test_lines(out / "train_log.txt")["test ppl"] < 12).all()
    lm, tokenizer, _ = load_lm_folder(out / "export")
    assert tokenizer.get_piece_size() == 256


def test_declared_keys_are_read_and_present() -> None:
    """train_LM.KEYS (checked up front by load_config) lists what the script, its data
    module and TrainingBrain read."""
    read = keys_read([REPO / "train_LM.py", REPO / "mamba_asr" / "text_data.py"])
    assert {"save_folder", "compute_cost", "export_folder", "max_chars"} <= read  # regexes work
    declared = set(train_LM.KEYS)
    needed = read | set(data.PREP_KEYS) | set(TRAINING_KEYS)
    assert needed <= declared, sorted(needed - declared)
    assert_declared_keys_present(declared, LM, LM_CONFIGS)


def test_training_keys_are_what_training_brain_reads(tmp_path: Path) -> None:
    """TRAINING_KEYS (the part of the LM's KEYS its Brain needs) covers every key that
    TrainingBrain and start_run read: the LM declares no ASR key and misses none."""
    code = tmp_path / "training.py"
    code.write_text(inspect.getsource(TrainingBrain) + inspect.getsource(start_run))
    read = keys_read([code])
    assert {"resume_from", "max_consecutive_nonfinite", "output_folder"} <= read
    assert read <= set(TRAINING_KEYS), sorted(read - set(TRAINING_KEYS))


# --------------------------------------------------------------------------- shared Brain behaviour

# train_LM.py with its training loss made NaN (and so its gradients) at the second batch.
NAN_AT_SECOND_BATCH = """\
import speechbrain as sb

import train_LM
from mamba_asr.config import cli

objectives = train_LM.LM.compute_objectives
train_batches = 0


def nan_at_second_batch(self, predictions, batch, stage):
    global train_batches
    loss = objectives(self, predictions, batch, stage)
    if stage == sb.Stage.TRAIN:
        train_batches += 1
        if train_batches == 2:
            return loss * float("nan")
    return loss


train_LM.LM.compute_objectives = nan_at_second_batch
cli(train_LM.main)
"""


def small_lm_args(tokenizer: Path, epochs: int) -> list[str]:
    """``epochs`` with the 128-piece demo tokenizer (no tokenizer training in the run)."""
    return [
        "--number_of_epochs", str(epochs), "--tokenizer_file", str(tokenizer),
        "--output_neurons", "128",
    ]


def demo_train_batches(manifests: Path, tmp_path: Path) -> int:
    """Batches per epoch of demo.yaml's bucketing sampler on the demo transcripts."""
    with open(LM / "demo.yaml") as f:
        demo = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "batches")})
    sentences = read_sentences(manifests / "train.csv")
    corpus = text_data.TextCorpus(spm.SentencePieceProcessor(), sentences)
    sampler = text_data.BucketBatchSampler(corpus.lengths, **demo["dynamic_batch_sampler_train"])
    return len(sampler)


def test_lm_brain_reshuffles_its_bucket_sampler_every_epoch(demo_tokenizer: Path) -> None:
    """TrainingBrain re-shuffles the LM's train batch sampler (SpeechBrain only does it under
    DDP), deterministically per epoch so that an intra-epoch checkpoint resumes exactly."""
    sentences = [" ".join(["WORD"] * (1 + i % 9)) for i in range(80)]
    corpus = text_data.TextCorpus(load_tokenizer(demo_tokenizer), sentences)
    sampler = text_data.BucketBatchSampler(corpus.lengths, max_batch_length=60, num_buckets=3)
    brain = train_LM.LM({"model": tiny_lm()}, None, {}, {"device": "cpu"})
    brain.make_dataloader(corpus, sb.Stage.TRAIN, batch_sampler=sampler, collate_fn=PaddedBatch)
    seen = {}
    for epoch in (1, 2, 1):
        brain.on_stage_start(sb.Stage.TRAIN, epoch)
        batches = [tuple(b) for b in sampler]
        assert seen.setdefault(epoch, batches) == batches
    assert seen[1] != seen[2]


@pytest.fixture(scope="module")
def nan_run(
    manifests: Path, demo_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """One epoch of demo.yaml whose second training batch has a NaN loss."""
    folder = tmp_path_factory.mktemp("nan_run")
    script = folder / "nan_at_second_batch.py"
    script.write_text(NAN_AT_SECOND_BATCH)
    out = folder / "run"
    run_train_lm(out, manifests, *small_lm_args(demo_tokenizer, 1), script=script)
    return {"out": out, "batches": demo_train_batches(manifests, folder)}


def test_nonfinite_step_is_skipped_counted_and_training_goes_on(nan_run: dict) -> None:
    out, batches = nan_run["out"], nan_run["batches"]
    assert batches > 10
    log = read_train_log(out / "train_log.txt")
    assert list(log.index) == [1]
    assert log.loc[1, "skipped_steps"] == 1
    assert log.loc[1, "steps"] == batches - 1  # every other batch was a step
    run_log = (out / "log.txt").read_text()
    assert "non-finite loss (nan): this step will be skipped" in run_log
    assert "gradient norm nan is not finite: step skipped (1 this epoch)" in run_log
    # The NaN never reached the weights, and the model learnt from the other batches.
    ckpt = Checkpointer(out / "save").find_checkpoint(min_key="loss")
    weights = torch.load(ckpt.path / "model.ckpt")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert math.isfinite(log.loc[1, "train loss"])
    assert log.loc[1, "valid ppl"] < 64  # half of a uniform distribution over 128 pieces
    assert ckpt.meta["ppl"] == pytest.approx(log.loc[1, "valid ppl"], rel=0.01)


def test_resume_from_a_named_checkpoint_once(
    nan_run: dict, manifests: Path, demo_tokenizer: Path, tmp_path: Path
) -> None:
    """A new output folder starts from the first run's checkpoint; its rerun continues
    from its own latest instead of starting from the named one again."""
    first = Checkpointer(nan_run["out"] / "save").find_checkpoint(min_key="loss")
    steps_before = read_train_log(nan_run["out"] / "train_log.txt").loc[1, "steps"]
    out = tmp_path / "resumed"
    args = [*small_lm_args(demo_tokenizer, 2), "--resume_from", str(first.path)]
    run_train_lm(out, manifests, *args)
    assert logged_epochs(out / "train_log.txt") == [2]  # epoch 1 came from the checkpoint
    log = read_train_log(out / "train_log.txt")
    assert log.loc[2, "steps"] == steps_before + nan_run["batches"]
    assert log.loc[2, "skipped_steps"] == 0
    marker = out / "save" / RESUME_MARKER
    assert marker.read_text().strip() == str(first.path.resolve())

    run_train_lm(out, manifests, *args)  # the same command again: nothing left to train
    assert logged_epochs(out / "train_log.txt") == [2]
    tests = read_test_lines(out / "train_log.txt")
    assert list(tests["Epoch loaded"]) == [2] * 4  # both runs tested epoch 2's checkpoint
