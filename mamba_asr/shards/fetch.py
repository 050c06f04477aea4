"""Shards as verified local files: local shards are read in place, others (``http(s)://``
with the standard library, any other scheme through ``fsspec``: ``s3://`` needs ``s3fs`` ...)
are downloaded with bounded retries into a cache, named by their sha256, then read from there.
Every shard's sha256 is checked against the index, once per process for a file that did not
change (path, size, mtime)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from mamba_asr.atomic import atomic_path
from mamba_asr.model_card import sha256_file
from mamba_asr.shards.index import ShardIndex, ShardInfo, is_local, local_path, parse_index

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 60
BACKOFF_S = 0.5  # doubled after every failed attempt, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0


class ShardUnavailable(Exception):
    """A shard that could not be fetched, or whose content does not match its sha256."""


def open_url(url: str) -> IO[bytes]:
    """A binary stream of ``url``: urllib for http(s), fsspec for any other scheme."""
    if urlparse(url).scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (schemes checked)
    try:
        import fsspec
    except ImportError as exc:
        raise ShardUnavailable(f"{url}: reading this scheme needs fsspec (pip install "
                               "fsspec, plus s3fs for s3://, gcsfs for gs://)") from exc
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:  # fsspec names the package the scheme needs
        raise ShardUnavailable(f"{url}: {exc}") from exc


def with_retries(what: str, attempt: Callable[[], object], retries: int) -> object:
    """``attempt()``, tried ``retries`` + 1 times with doubling waits while it raises
    OSError/ShardUnavailable; the last error names ``what``."""
    for n in range(retries + 1):
        try:
            return attempt()
        except (OSError, ShardUnavailable) as exc:
            if n == retries:
                raise ShardUnavailable(f"{what}: {exc} (after {retries + 1} attempts)") from exc
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** n)
            logger.info("%s: %s; retrying in %.1f s", what, exc, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def read_index(location: str | os.PathLike, retries: int = 3) -> ShardIndex:
    """The ``shards.json`` at a path or URL (downloaded with ``retries``); FileNotFoundError
    or ValueError naming it when it cannot be read."""
    location = str(location)
    if is_local(location):
        path = Path(local_path(location))
        if not path.is_file():
            raise FileNotFoundError(f"train_shards: {location} does not exist (expected the "
                                    "shards.json written by make_shards.py)")
        return parse_index(path.read_text(encoding="utf-8"), location)

    def download() -> str:
        with open_url(location) as f:
            return f.read().decode("utf-8")

    try:
        text = with_retries(location, download, retries)
    except ShardUnavailable as exc:
        raise FileNotFoundError(f"train_shards: {exc}") from exc
    return parse_index(text, location)


class ShardFetcher:
    """Gives each shard of ``index`` as a verified local file (:meth:`local`)."""

    def __init__(self, index: ShardIndex, cache: str | os.PathLike, retries: int) -> None:
        self.index = index
        self.cache = Path(cache)
        self.retries = retries
        self._verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns)

    def local(self, shard: ShardInfo) -> Path:
        """The shard's verified local file; ShardUnavailable naming it when it cannot be
        fetched after the retries or does not match its sha256."""
        url = self.index.shard_url(shard)
        if is_local(url):
            path = Path(local_path(url))
            return with_retries(f"shard {url}", lambda: self._verify(path, shard), self.retries)
        cached = self.cache / f"{shard.sha256}.tar"
        if cached.is_file():
            try:
                return self._verify(cached, shard)
            except ShardUnavailable:
                cached.unlink(missing_ok=True)  # damaged in the cache: fetched again
        return with_retries(f"shard {url}", lambda: self._download(url, cached, shard),
                            self.retries)

    def _verify(self, path: Path, shard: ShardInfo) -> Path:
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise ShardUnavailable("no such file") from exc
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._verified:
            if stat.st_size != shard.bytes:
                raise ShardUnavailable(f"{stat.st_size} bytes, the index says {shard.bytes}")
            digest = sha256_file(path)
            if digest != shard.sha256:
                raise ShardUnavailable(f"sha256 {digest} does not match the index's "
                                       f"{shard.sha256}")
            self._verified.add(key)
        return path

    def _download(self, url: str, cached: Path, shard: ShardInfo) -> Path:
        digest = hashlib.sha256()
        with atomic_path(cached) as tmp:
            with open_url(url) as src, open(tmp, "wb") as dst:
                while block := src.read(CHUNK):
                    digest.update(block)
                    dst.write(block)
            if digest.hexdigest() != shard.sha256:  # raising here removes the temporary
                raise ShardUnavailable(f"downloaded sha256 {digest.hexdigest()} does not match "
                                       f"the index's {shard.sha256}")
        stat = cached.stat()
        self._verified.add((str(cached), stat.st_size, stat.st_mtime_ns))
        return cached
