"""``make_shards.py``: a manifest's utterances as WebDataset tar shards plus ``shards.json``.

Per utterance a shard holds two members, ``<key>.<ext>`` (the audio file's bytes as stored,
under its own extension) and ``<key>.json`` (``id``, ``duration``, ``words``, ``speaker``);
the key is the utterance ID made safe for WebDataset (no dots or slashes). Shards are filled
in manifest order up to ``shard_size_mb`` (an utterance never spans two), with fixed member
names, times and owners, so the same input gives byte-identical shards. Each shard is written
under a temporary name and renamed; the index last, so a folder with an index is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from webdataset import TarWriter

from mamba_asr.atomic import atomic_open, atomic_path
from mamba_asr.shards.index import INDEX_NAME, ShardIndex, ShardInfo

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Utterance:
    """A manifest row to write: ID, seconds, audio file, transcript, speaker."""

    id: str
    duration: float
    wav: Path
    words: str
    speaker: str

    @property
    def key(self) -> str:
        """The WebDataset key: the ID with every character but letters, digits, _ and -
        replaced by _ (WebDataset splits member names at the first dot)."""
        return _UNSAFE.sub("_", self.id)


def manifest_utterances(manifest: str | os.PathLike, data_folder: str | None) -> list[Utterance]:
    """The manifest's rows in order, ``$data_root`` resolved as the recipes do; a missing
    audio file or two IDs with the same key raise, naming them, before anything is written."""
    from mamba_asr.data import load_manifest

    data = load_manifest(manifest, data_folder)
    utterances, keys = [], {}
    for uid in data.data_ids:
        row = data.data[uid]
        try:
            utt = Utterance(uid, float(row["duration"]), Path(row["wav"]), str(row["wrd"]),
                            str(row["spk_id"]))
        except KeyError as exc:
            raise ValueError(f"{manifest}: column {exc} missing (expected ID, duration, wav, "
                             "spk_id, wrd)") from exc
        if not utt.wav.is_file():
            raise FileNotFoundError(f"{manifest}: audio file {utt.wav} of utterance {uid} "
                                    "does not exist")
        if utt.key in keys:
            raise ValueError(f"{manifest}: utterances {keys[utt.key]} and {uid} have the same "
                             f"shard key {utt.key}")
        keys[utt.key] = uid
        utterances.append(utt)
    if not utterances:
        raise ValueError(f"{manifest} holds no utterance")
    return utterances


def shard_groups(utterances: list[Utterance], max_bytes: int) -> list[list[Utterance]]:
    """Consecutive groups of at most ``max_bytes`` of audio (one utterance at least)."""
    groups: list[list[Utterance]] = [[]]
    size = 0
    for utt in utterances:
        n = utt.wav.stat().st_size
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(utt)
        size += n
    return groups


def write_shard(path: Path, utterances: list[Utterance]) -> ShardInfo:
    """One shard at ``path`` (atomically); its index entry (name: the file name)."""
    with atomic_open(path, "wb") as f:
        with TarWriter(f, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
            for utt in utterances:
                meta = {"id": utt.id, "duration": utt.duration, "words": utt.words,
                        "speaker": utt.speaker}
                tar.write({
                    "__key__": utt.key,
                    utt.wav.suffix.lower().lstrip(".") or "audio": utt.wav.read_bytes(),
                    "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
                })
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ShardInfo(path.name, len(utterances), round(sum(u.duration for u in utterances), 6),
                     path.stat().st_size, digest)


def make_shards(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    shard_size_mb: float = 256,
    data_folder: str | None = None,
    overwrite: bool = False,
) -> ShardIndex:
    """Writes the shards of ``manifest`` and ``<out>/shards.json``; returns the index.

    FileExistsError when ``out`` already has an index (unless ``overwrite``: the old index is
    removed first, then shards it listed that the new one does not)."""
    if shard_size_mb <= 0:
        raise ValueError(f"--shard_size_mb must be positive, not {shard_size_mb}")
    out = Path(out)
    index_path = out / INDEX_NAME
    if index_path.exists() and not overwrite:
        raise FileExistsError(f"{index_path} exists: pass --overwrite to replace those shards, "
                              "or choose another --out")
    utterances = manifest_utterances(manifest, data_folder)
    groups = shard_groups(utterances, int(shard_size_mb * 2**20))
    out.mkdir(parents=True, exist_ok=True)
    old = set(out.glob("shard-*.tar"))
    index_path.unlink(missing_ok=True)
    shards = []
    for n, group in enumerate(groups):
        shards.append(write_shard(out / SHARD_PATTERN.format(n), group))
        logger.info("%s: %d utterances, %.1f s of audio", shards[-1].name, len(group),
                    shards[-1].seconds)
    for stale in old - {out / s.name for s in shards}:
        stale.unlink()
    index = ShardIndex(str(index_path), Path(manifest).name, tuple(shards))
    with atomic_path(index_path) as tmp:
        tmp.write_text(json.dumps(index.to_json(), indent=1) + "\n", encoding="utf-8")
    return index
