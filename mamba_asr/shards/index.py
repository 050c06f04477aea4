"""The index of a set of shards, ``shards.json``: format version, source manifest, totals, and
per shard its name (relative to the index), utterances, seconds of audio, bytes and sha256."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

INDEX_NAME = "shards.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One shard of the index; ``name`` is relative to the index's location."""

    name: str
    utterances: int
    seconds: float
    bytes: int
    sha256: str

    @property
    def hours(self) -> float:
        """Hours of audio in the shard."""
        return self.seconds / 3600


@dataclass(frozen=True)
class ShardIndex:
    """A ``shards.json``: ``location`` is where it was read from (path or URL), what the
    shard names are relative to."""

    location: str
    source: str
    shards: tuple[ShardInfo, ...]

    @property
    def utterances(self) -> int:
        """Utterances in all shards."""
        return sum(s.utterances for s in self.shards)

    @property
    def seconds(self) -> float:
        """Seconds of audio in all shards."""
        return sum(s.seconds for s in self.shards)

    def shard_url(self, shard: ShardInfo) -> str:
        """Where ``shard`` is: a path beside a local index, else a URL beside the index's."""
        if is_local(self.location):
            return str(Path(local_path(self.location)).parent / shard.name)
        if urlparse(self.location).scheme in ("http", "https"):
            return urljoin(self.location, shard.name)
        return f"{self.location.rsplit('/', 1)[0]}/{shard.name}"  # urljoin ignores s3:// ...

    def to_json(self) -> dict[str, Any]:
        """The content of ``shards.json``."""
        return {
            "format": FORMAT_VERSION,
            "source": self.source,
            "shards_total": len(self.shards),
            "utterances": self.utterances,
            "hours": round(self.seconds / 3600, 6),
            "shards": [asdict(s) for s in self.shards],
        }


def is_local(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a local path or a ``file://`` URL."""
    scheme = urlparse(str(location)).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(location: str | os.PathLike) -> str:
    """The path of a local location (a ``file://`` URL's path)."""
    location = str(location)
    return urlparse(location).path if location.startswith("file://") else location


def parse_index(text: str, location: str) -> ShardIndex:
    """The index in ``text`` (read from ``location``); ValueError naming ``location`` and
    what is wrong when it is not a shards index of a known format."""
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT_VERSION}")
        shards = tuple(
            ShardInfo(str(s["name"]), int(s["utterances"]), float(s["seconds"]),
                      int(s["bytes"]), str(s["sha256"]))
            for s in raw["shards"]
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{location} is not a {INDEX_NAME} written by make_shards.py: "
                         f"{exc}") from exc
    if not shards:
        raise ValueError(f"{location} lists no shard")
    return ShardIndex(str(location), str(raw.get("source", "")), shards)
