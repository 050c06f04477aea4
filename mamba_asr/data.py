"""Data set-up the LibriSpeech recipes share: manifests, filtering/sorting, samplers, tokens.

The recipes (``train_CTC.py``, ``train_S2S.py``, ``evaluate.py``) keep only their audio/text
pipelines; everything here is driven by the keys of their YAML files:

* :func:`prepare_manifests` runs ``librispeech_prepare.prepare_librispeech`` on the main process
  (``data_folder``, ``prep_folder``, ``train_splits``, ``dev_splits``, ``test_splits``,
  ``select_n_sentences``, ``skip_prep``); manifests hold ``$data_root`` paths.
* :func:`load_manifest` reads a manifest with ``$data_root`` replaced by the LibriSpeech folder.
* :func:`training_set` filters (``avoid_if_longer_than``) and sorts (``sorting``) the training set;
  :func:`shard_training_set` is the training set read from ``train_shards`` instead.
* :func:`dataio_prepare` gives a recipe its train/valid/test sets with its pipelines.
* :func:`loader_options` builds the train/valid loader arguments, with SpeechBrain's
  ``DynamicBatchSampler`` when ``dynamic_batching`` is on.
* :func:`add_audio_pipelines` gives datasets their ``sig`` item (mono, at ``sample_rate``:
  other rates resampled, with one warning; speed-perturbed for training; a file that fails to
  decode marked for its batch to drop, see :mod:`mamba_asr.unreadable_audio`).
* :func:`char_encoder` creates once, then loads, the character map of the CTC recipe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.utils.distributed import if_main_process, run_on_main

from mamba_asr.atomic import atomic_path
from mamba_asr.audio_info import AudioHeaderError, format_summary, read_audio_info
from mamba_asr.audio_io import AudioBytes, AudioError, load_audio
from mamba_asr.librispeech import librispeech_root, prepare_librispeech
from mamba_asr.shards.dataset import ShardDataset
from mamba_asr.shards.fetch import read_index
from mamba_asr.unreadable_audio import UnreadableAudio

logger = logging.getLogger(__name__)

SORTINGS = ("random", "ascending", "descending")
MERGED_TRAIN_CSV = "train.csv"
# The YAML keys read here: by prepare_manifests, and by all (config.load_config checks them).
PREP_KEYS = (
    "data_folder", "prep_folder", "train_splits", "dev_splits", "test_splits",
    "select_n_sentences", "skip_prep",
)
DATA_KEYS = (
    *PREP_KEYS, "train_csv", "train_shards", "shard_cache", "shard_retries", "seed", "valid_csv",
    "test_csv",
    "avoid_if_longer_than", "sorting", "dynamic_batching", "dynamic_batch_sampler_train",
    "dynamic_batch_sampler_val", "num_workers", "train_dataloader_opts", "valid_dataloader_opts",
    "speed_perturb", "sample_rate",
)


def prepare_manifests(hparams: dict[str, Any]) -> None:
    """Write the split CSVs (and the merged ``train.csv``) into ``prep_folder``, on the main
    process only; idempotent, and a no-op with ``skip_prep``."""
    run_on_main(
        prepare_librispeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["prep_folder"],
            "tr_splits": hparams["train_splits"],
            "dev_splits": hparams["dev_splits"],
            "te_splits": hparams["test_splits"],
            "select_n_sentences": hparams["select_n_sentences"],
            "merge_lst": hparams["train_splits"],
            "merge_name": MERGED_TRAIN_CSV,
            "skip_prep": hparams["skip_prep"],
            "data_root_placeholder": True,
        },
    )


def check_data_folder(hparams: dict[str, Any]) -> None:
    """LibriSpeechPrepError unless ``data_folder`` exists (unless ``skip_prep``): the recipes
    check it before they write the experiment folder."""
    if not hparams["skip_prep"]:
        librispeech_root(hparams["data_folder"])


def load_manifest(csv_path: str | os.PathLike, data_folder: str | None) -> DynamicItemDataset:
    """A manifest as a dataset, ``$data_root`` replaced by ``librispeech_root(data_folder)``.
    A missing file raises FileNotFoundError naming it."""
    if not Path(csv_path).is_file():
        raise FileNotFoundError(
            f"manifest {csv_path} does not exist: run the preparation (skip_prep: False, "
            "or librispeech_prepare.py) or point train_csv/valid_csv/test_csv at existing CSVs"
        )
    replacements = {"data_root": str(librispeech_root(data_folder))} if data_folder else {}
    try:
        return DynamicItemDataset.from_csv(csv_path, replacements=replacements)
    except KeyError as exc:
        raise ValueError(
            f"{csv_path} holds $data_root paths: pass --data_folder (the LibriSpeech folder "
            f"or the folder holding it) ({exc})"
        ) from exc


def training_set(hparams: dict[str, Any]) -> DynamicItemDataset:
    """The training set without utterances longer than ``avoid_if_longer_than`` seconds,
    ordered by ``sorting`` (``random`` keeps the manifest order for the loader to shuffle)."""
    data = load_manifest(hparams["train_csv"], hparams["data_folder"])
    sorting = hparams["sorting"]
    if sorting not in SORTINGS:
        raise ValueError(f"sorting must be one of {', '.join(SORTINGS)}, not {sorting!r}")
    n_before = len(data)
    longest = hparams["avoid_if_longer_than"]
    key_max = {"duration": float(longest)} if longest else None
    if sorting == "random":
        if key_max:
            data = data.filtered_sorted(key_max_value=key_max)
    else:
        data = data.filtered_sorted(
            sort_key="duration", reverse=sorting == "descending", key_max_value=key_max
        )
    if len(data) < n_before:
        logger.info(
            "dropped %d of %d training utterances longer than %s s",
            n_before - len(data), n_before, longest,
        )
    if len(data) == 0:
        raise ValueError(f"no training utterance left in {hparams['train_csv']}")
    return data


def shard_training_set(hparams: dict[str, Any]) -> ShardDataset:
    """The training set read from the shards of ``train_shards`` (a ``shards.json`` path or
    URL), downloaded shards cached in ``shard_cache`` with ``shard_retries``; batched as
    ``dynamic_batch_sampler_train`` says (``train_dataloader_opts``' ``batch_size`` without
    ``dynamic_batching``), utterances longer than ``avoid_if_longer_than`` left out."""
    retries = hparams["shard_retries"]
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"shard_retries must be a count >= 0, not {retries!r}")
    index = read_index(hparams["train_shards"], retries)
    if hparams["dynamic_batching"]:
        opts = hparams["dynamic_batch_sampler_train"]
        batching = {"max_batch_length": opts["max_batch_length"],
                    "max_batch_ex": opts.get("max_batch_ex")}
    else:
        batching = {"batch_size": hparams["train_dataloader_opts"]["batch_size"]}
    longest = hparams["avoid_if_longer_than"]
    logger.info("training from %d shards (%d utterances, %.2f h) of %s", len(index.shards),
                index.utterances, index.seconds / 3600, hparams["train_shards"])
    return ShardDataset(index, hparams["shard_cache"], retries, hparams["seed"],
                        float(longest) if longest else None, **batching)


def evaluation_set(csv_path: str | os.PathLike, data_folder: str | None) -> DynamicItemDataset:
    """A validation/test manifest, shortest utterances first (less padding); nothing dropped."""
    return load_manifest(csv_path, data_folder).filtered_sorted(sort_key="duration")


def test_sets(hparams: dict[str, Any]) -> dict[str, DynamicItemDataset]:
    """Every ``test_csv`` by name (the file stem, e.g. ``test-clean``)."""
    folder = hparams["data_folder"]
    return {Path(csv).stem: evaluation_set(csv, folder) for csv in hparams["test_csv"]}


def dataio_prepare(
    hparams: dict[str, Any],
    tokenizer: Any,
    add_pipelines: Callable[[dict[str, Any], Any, Any, list[Any]], None],
) -> tuple[DynamicItemDataset, DynamicItemDataset, dict[str, DynamicItemDataset]]:
    """``(train, valid, {test name: test set})`` of an ASR recipe: :func:`training_set` (or
    :func:`shard_training_set` with ``train_shards``), the ``valid_csv`` and :func:`test_sets`
    manifests, given their items (audio, tokens) by the recipe's ``add_pipelines(hparams,
    tokenizer, train, evaluation_sets)``."""
    train = shard_training_set(hparams) if hparams["train_shards"] else training_set(hparams)
    valid = evaluation_set(hparams["valid_csv"], hparams["data_folder"])
    tests = test_sets(hparams)
    add_pipelines(hparams, tokenizer, train, [valid, *tests.values()])
    return train, valid, tests


def dynamic_batch_sampler(data: DynamicItemDataset, options: dict[str, Any]) -> DynamicBatchSampler:
    """SpeechBrain's ``DynamicBatchSampler`` over durations in seconds (``max_batch_length``)."""
    return DynamicBatchSampler(data, length_func=lambda x: x["duration"], **options)


def loader_options(
    hparams: dict[str, Any],
    train_data: DynamicItemDataset,
    valid_data: DynamicItemDataset,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of the train and valid loaders for ``Brain.fit``.

    With ``dynamic_batching`` they carry a ``DynamicBatchSampler`` each; the train sampler is
    re-shuffled every epoch by ``RecipeBrain`` (``set_epoch``). Otherwise the YAML's
    ``train_dataloader_opts`` (shuffling only with ``sorting: random``) and
    ``valid_dataloader_opts``. A ``ShardDataset`` batches itself: its loader takes
    ``num_workers`` only.
    """
    if isinstance(train_data, ShardDataset):
        valid = {"batch_sampler": dynamic_batch_sampler(valid_data,
                                                         hparams["dynamic_batch_sampler_val"])}
        if not hparams["dynamic_batching"]:
            valid = dict(hparams["valid_dataloader_opts"])
        return {"num_workers": hparams["num_workers"]}, valid
    if hparams["dynamic_batching"]:
        train_sampler = dynamic_batch_sampler(train_data, hparams["dynamic_batch_sampler_train"])
        valid_sampler = dynamic_batch_sampler(valid_data, hparams["dynamic_batch_sampler_val"])
        train = {"batch_sampler": train_sampler, "num_workers": hparams["num_workers"]}
        valid = {"batch_sampler": valid_sampler}
        return train, valid
    train = dict(hparams["train_dataloader_opts"])
    train["shuffle"] = train.get("shuffle", False) and hparams["sorting"] == "random"
    return train, dict(hparams["valid_dataloader_opts"])


def audio_format_warning(datasets: Sequence[Any], sample_rate: int) -> str | None:
    """What a header scan of the datasets' ``wav`` files (no decoding) finds the audio
    pipelines will change: the count of files at another sample rate (by rate) and of
    multi-channel files, with an example of each; None when every file is ``sample_rate`` Hz
    mono. Raises FileNotFoundError / AudioHeaderError naming a missing or unreadable file."""
    files = {d.data[uid]["wav"]: uid for d in datasets for uid in d.data_ids}
    infos = {}
    for wav, uid in files.items():
        try:
            infos[wav] = read_audio_info(wav)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"audio file {wav} of utterance {uid} does not exist") from exc
        except (OSError, AudioHeaderError) as exc:
            raise AudioHeaderError(f"audio file {wav} of utterance {uid}: {exc}") from exc
    return format_summary(infos, sample_rate)


def load_or_mark(wav: str | AudioBytes, sample_rate: int) -> torch.Tensor | UnreadableAudio:
    """``load_audio(wav, sample_rate)``, or an ``UnreadableAudio`` marker naming the file and
    the reason when it cannot be decoded (AudioError)."""
    try:
        return load_audio(wav, sample_rate)
    except AudioError as exc:
        return UnreadableAudio(str(wav), exc.reason)


def add_audio_pipelines(hparams: dict[str, Any], train: Any, evaluation: Sequence[Any]) -> None:
    """Adds ``sig`` (the mono waveform at the YAML's ``sample_rate``, (samples,)) to ``train``
    (None: no training set), speed-perturbed by the YAML's ``speed_perturb`` unless null, and
    to the ``evaluation`` sets.

    Files at another rate are resampled and multi-channel files averaged to mono
    (``audio_io.load_audio``, as transcription reads them); the main process warns once, with
    their count (:func:`audio_format_warning`), and fails naming a missing or unreadable file.
    A file that passes that header scan but fails to decode later (truncated or damaged after
    its header: ``load_audio`` compares the decoded length with the header's) gives an
    ``UnreadableAudio`` marker, which the loaders' collate function drops.
    """
    rate = hparams["sample_rate"]
    if if_main_process():  # (shards hold no file names to scan: read when training)
        scanned = [d for d in [train, *evaluation] if d is not None
                   and not isinstance(d, ShardDataset)]
        warning = audio_format_warning(scanned, rate)
        if warning is not None:
            logger.warning(warning)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav: str) -> torch.Tensor | UnreadableAudio:
        return load_or_mark(wav, rate)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline_train(wav: str) -> torch.Tensor | UnreadableAudio:
        sig = load_or_mark(wav, rate)
        if isinstance(sig, UnreadableAudio):
            return sig
        if hparams["speed_perturb"] is not None:  # here, so that loader workers do it
            sig = hparams["speed_perturb"](sig.unsqueeze(0)).squeeze(0)
        return sig

    if train is not None:
        sb.dataio.dataset.add_dynamic_item([train], audio_pipeline_train)
    if evaluation:
        sb.dataio.dataset.add_dynamic_item(list(evaluation), audio_pipeline)


def char_encoder(
    path: str | os.PathLike,
    characters: str,
    blank_index: int,
    bos_index: int,
    eos_index: int,
    num_outputs: int,
) -> CTCTextEncoder:
    """The character map at ``path``: created once (main process) as blank, bos, eos at their
    indices and then ``characters`` in order, loaded afterwards so that a resumed run or an
    evaluation uses the map the model was trained with. Raises ValueError when the file's map
    does not hold ``characters`` or has other than ``num_outputs`` labels."""
    path = Path(path)

    def create() -> None:
        if path.exists():
            return
        encoder = CTCTextEncoder()
        encoder.insert_blank(index=blank_index)
        encoder.insert_bos_eos(bos_index=bos_index, eos_index=eos_index)
        encoder.update_from_iterable(characters, sequence_input=False)
        with atomic_path(path) as tmp:
            encoder.save(tmp)

    run_on_main(create)
    encoder = CTCTextEncoder()
    encoder.load(path)
    encoder.expect_len(num_outputs)
    missing = [c for c in characters if c not in encoder.lab2ind]
    if missing or len(encoder) != num_outputs or encoder.get_blank_index() != blank_index:
        raise ValueError(
            f"character map {path} ({len(encoder)} labels, blank {encoder.get_blank_index()}) "
            f"does not match the configuration ({num_outputs} outputs, blank {blank_index}, "
            f"characters {characters!r}; missing {missing}); it belongs to another model"
        )
    return encoder
