#!/usr/bin/env python3
"""Utterances per second delivered to the training loop (the train loader iterated, no model)
from loose FLAC files (the manifest loader as train_CTC.py builds it: DynamicBatchSampler),
from local shards and from shards served over HTTP (a server on 127.0.0.1 started here; the
shard cache starts empty, so every shard is downloaded and verified), with the CTC recipe's
audio and text pipelines and 2 loader workers.

Usage:
    python bench/bench_data.py                         # the demo corpus' 3,040 utterances
    python bench/bench_data.py --utterances 1000 --shard_size_mb 8 --repeats 3

Before each run the page cache is dropped where the machine allows: ``/proc/sys/vm/
drop_caches`` (root), else ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file read (audio
files, shards; clean pages need no privilege); the table says which worked.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import speechbrain as sb  # noqa: E402
from speechbrain.dataio.encoder import CTCTextEncoder  # noqa: E402

from mamba_asr import data  # noqa: E402
from mamba_asr.shards.dataset import ShardLoader  # noqa: E402
from mamba_asr.shards.index import INDEX_NAME  # noqa: E402
from mamba_asr.shards.training import ShardProgress  # noqa: E402
from mamba_asr.shards.writer import make_shards  # noqa: E402
from mamba_asr.unreadable_audio import collate_readable  # noqa: E402
from train_CTC import add_pipelines  # noqa: E402


def drop_cache(files: Iterable[Path]) -> str:
    """Drops the page cache (all of it as root, else ``files``' pages); what worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"
    except (OSError, AttributeError):
        return "none"


def hparams_for(work: Path, corpus: str, train_shards: str | None) -> dict:
    """The data keys of hparams/CTC/demo.yaml that the loaders read."""
    return {
        "train_csv": str(work / "prep" / "train.csv"), "data_folder": corpus,
        "train_shards": train_shards, "shard_cache": str(work / "cache"), "shard_retries": 2,
        "sorting": "random", "avoid_if_longer_than": None, "dynamic_batching": True,
        "dynamic_batch_sampler_train": {"max_batch_length": 30, "num_buckets": 20,
                                        "shuffle": True, "batch_ordering": "random",
                                        "max_batch_ex": 128, "seed": 3402},
        "dynamic_batch_sampler_val": {"max_batch_length": 100, "num_buckets": 20,
                                      "shuffle": False, "batch_ordering": "ascending"},
        "num_workers": 2, "train_dataloader_opts": {"batch_size": 32},
        "valid_dataloader_opts": {"batch_size": 32}, "seed": 3402, "sample_rate": 16000,
        "speed_perturb": None,
    }


def encoder() -> CTCTextEncoder:
    """A character map covering the demo transcripts."""
    enc = CTCTextEncoder()
    enc.insert_blank(index=0)
    enc.update_from_iterable("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ", sequence_input=False)
    enc.ignore_len()
    return enc


def loose_loader(hp: dict) -> Iterable:
    """The manifest's train loader as the recipe builds it."""
    train = data.training_set(hp)
    add_pipelines(hp, encoder(), train, [])
    opts, _ = data.loader_options(hp, train, train)
    return sb.dataio.dataloader.make_dataloader(train, collate_fn=collate_readable, **opts)


def shard_loader(hp: dict) -> Iterable:
    """The shards' train loader as the recipe builds it."""
    train = data.shard_training_set(hp)
    add_pipelines(hp, encoder(), train, [])
    loader = ShardLoader(train, hp["num_workers"], collate_readable, ShardProgress(train.index))
    loader.set_epoch(1)
    return loader


def timed(make: Callable[[], Iterable]) -> tuple[int, float, float]:
    """(utterances, seconds of audio, wall seconds) of one pass over ``make()``."""
    loader = make()
    start = time.perf_counter()
    n, audio = 0, 0.0
    for batch in loader:
        n += len(batch.id)
        audio += float(batch.sig[1].sum()) * batch.sig[0].shape[1] / 16000
    return n, audio, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_folder", default=str(REPO / "data" / "demo"))
    parser.add_argument("--utterances", type=int, default=None, help="first N (default all)")
    parser.add_argument("--shard_size_mb", type=float, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        data.prepare_manifests({
            "data_folder": args.data_folder, "prep_folder": str(work / "prep"),
            "train_splits": ["train-clean-100"], "dev_splits": [], "test_splits": [],
            "select_n_sentences": [args.utterances], "skip_prep": False,
        })
        index = make_shards(work / "prep" / "train.csv", work / "shards", args.shard_size_mb,
                            args.data_folder)
        hp = hparams_for(work, args.data_folder, None)
        audio_files = [Path(r["wav"]) for r in data.load_manifest(
            hp["train_csv"], args.data_folder).data.values()]
        shard_files = [work / "shards" / s.name for s in index.shards]

        handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                       {"log_message": lambda *a: None})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(work / "shards")))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{INDEX_NAME}"
        sources = {
            "loose FLAC files (manifest)": (lambda: loose_loader(hp), audio_files),
            "local shards": (lambda: shard_loader({**hp, "train_shards": str(
                work / "shards" / INDEX_NAME)}), shard_files),
            "HTTP shards (127.0.0.1, empty cache)": (lambda: shard_loader(
                {**hp, "train_shards": url}), shard_files),
        }
        rows = []
        for name, (make, files) in sources.items():
            best = None
            for _ in range(args.repeats):
                shutil.rmtree(work / "cache", ignore_errors=True)
                how = drop_cache(files)
                n, audio, wall = timed(make)
                if best is None or wall < best[2]:
                    best = (n, audio, wall, how)
            rows.append((name, *best))
        server.shutdown()
        base = rows[0][1] / rows[0][3]
        print(f"{len(index.shards)} shards of {args.shard_size_mb:g} MB at most, "
              f"{index.utterances} utterances, {index.seconds / 3600:.2f} h; 2 loader workers; "
              f"best of {args.repeats}\n")
        print("| source | utterances | utt/s | audio s/s | vs loose files | page cache |")
        print("|---|---:|---:|---:|---:|---|")
        for name, n, audio, wall, how in rows:
            print(f"| {name} | {n} | {n / wall:.0f} | {audio / wall:.0f} | "
                  f"{n / wall / base:.2f} | {how} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
