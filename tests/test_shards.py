"""WebDataset shards: make_shards.py, the epoch plan, the shard loader (one process with 2
workers; a 2-process gloo group), and recipe runs from shards served over HTTP and resumed
after a kill mid-epoch."""

from __future__ import annotations

import csv
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from runs import CTC_DEMO, ENV, REPO
from speechbrain.dataio.encoder import CTCTextEncoder

from mamba_asr import data
from mamba_asr.shards.dataset import ShardDataset, ShardLoader
from mamba_asr.shards.fetch import read_index
from mamba_asr.shards.index import INDEX_NAME, ShardInfo
from mamba_asr.shards.plan import balance, process_shards, worker_shards
from mamba_asr.shards.training import ShardProgress
from mamba_asr.shards.writer import make_shards
from mamba_asr.unreadable_audio import collate_readable

N_UTTS = 40
SHARD_MB = 0.2  # 8 shards of the first 40 demo utterances


@pytest.fixture(scope="module")
def manifest(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 training utterances of the demo corpus ($data_root paths)."""
    folder = tmp_path_factory.mktemp("shard_prep")
    data.prepare_manifests({
        "data_folder": str(demo_corpus), "prep_folder": str(folder),
        "train_splits": ["train-clean-100"], "dev_splits": [], "test_splits": [],
        "select_n_sentences": [N_UTTS], "skip_prep": False,
    })
    return folder / "train.csv"


@pytest.fixture(scope="module")
def rows(manifest: Path, demo_corpus: Path) -> list[dict]:
    """The manifest's rows, ``$data_root`` resolved."""
    root = str(data.librispeech_root(str(demo_corpus)))
    with open(manifest, newline="") as f:
        return [{**r, "wav": r["wav"].replace("$data_root", root)} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def shards(manifest: Path, demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shards.json`` of the manifest in 8 shards."""
    out = tmp_path_factory.mktemp("shards")
    make_shards(manifest, out, SHARD_MB, str(demo_corpus))
    return out / INDEX_NAME


def test_make_shards_is_deterministic_and_indexed(shards, manifest, demo_corpus, rows,
                                                  tmp_path) -> None:
    again = make_shards(manifest, tmp_path, SHARD_MB, str(demo_corpus))
    index = json.loads(shards.read_text())
    assert json.loads((tmp_path / INDEX_NAME).read_text()) == index
    assert len(index["shards"]) >= 4 and index["utterances"] == N_UTTS == len(rows)
    assert index["source"] == "train.csv" and len(again.shards) == len(index["shards"])
    ids = []
    for entry in index["shards"]:
        path = shards.parent / entry["name"]
        content = path.read_bytes()
        assert content == (tmp_path / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["bytes"] == len(content)
        with tarfile.open(path) as tar:
            names = tar.getnames()
            metas = [json.load(tar.extractfile(n)) for n in names if n.endswith(".json")]
            assert {m.mtime for m in tar.getmembers()} == {0}
        assert entry["utterances"] == len(metas)
        by_id = {r["ID"]: r for r in rows}
        assert entry["seconds"] == pytest.approx(sum(float(by_id[m["id"]]["duration"])
                                                     for m in metas))
        for meta in metas:  # the audio bytes as stored, the transcript and speaker
            row = by_id[meta["id"]]
            assert (meta["words"], meta["speaker"]) == (row["wrd"], row["spk_id"])
            with tarfile.open(path) as tar:
                stored = tar.extractfile(f"{meta['id']}.flac").read()
            assert stored == Path(row["wav"]).read_bytes()
        ids += [m["id"] for m in metas]
    assert ids == [r["ID"] for r in rows]  # manifest order
    assert index["hours"] == pytest.approx(sum(float(r["duration"]) for r in rows) / 3600,
                                           abs=1e-6)


def test_make_shards_refuses_an_index_and_names_a_missing_file(shards, manifest, demo_corpus,
                                                              tmp_path) -> None:
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards(manifest, shards.parent, SHARD_MB, str(demo_corpus))
    text = manifest.read_text().splitlines()
    broken = tmp_path / "broken.csv"
    missing = text[5].split(",")[2].replace(".flac", "-gone.flac")
    text[5] = ",".join([*text[5].split(",")[:2], missing, *text[5].split(",")[3:]])
    broken.write_text("\n".join(text) + "\n")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"-gone\.flac of utterance"):
        make_shards(broken, out, SHARD_MB, str(demo_corpus))
    assert not (out / INDEX_NAME).exists()
    assert not list(out.glob("*")) if out.exists() else True


def test_make_shards_command(shards, manifest, demo_corpus, capsys) -> None:
    import make_shards as script

    args = [str(manifest), "--out", str(shards.parent), "--shard_size_mb", str(SHARD_MB),
            "--data_folder", str(demo_corpus)]
    with pytest.raises(SystemExit, match=r"make_shards\.py: .*shards\.json exists"):
        script.main(args)
    before = shards.read_bytes()
    script.main([*args, "--overwrite"])
    assert shards.read_bytes() == before  # the same shards again
    assert f"{N_UTTS} utterances" in capsys.readouterr().out


def _infos(seconds: list[float]) -> list[ShardInfo]:
    return [ShardInfo(f"s{i}", 1, s, 1, "") for i, s in enumerate(seconds)]


def test_plan_gives_every_shard_to_one_reader_balanced_by_hours() -> None:
    shards = _infos([30, 5, 12, 40, 7, 9, 22, 3, 18, 11, 6])
    names = {s.name for s in shards}
    readers = [[s.name for s in worker_shards(shards, 5, 1, rank, 2, w, 2)]
               for rank in range(2) for w in range(2)]
    flat = [n for r in readers for n in r]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    per_process = process_shards(shards, 5, 1, 2)
    totals = [sum(s.seconds for s in p) for p in per_process]
    assert abs(totals[0] - totals[1]) <= max(s.seconds for s in shards)
    assert {s.name for s in process_shards(shards, 5, 2, 2)[0]} != {
        s.name for s in per_process[0]}  # other shards per process every epoch
    assert process_shards(shards, 5, 1, 2) == per_process  # deterministic
    left = process_shards(shards, 5, 1, 2, exclude=frozenset({"s0", "s3"}))
    assert sorted(s.name for p in left for s in p) == sorted(names - {"s0", "s3"})
    assert balance(_infos([1, 2]), 4)[2:] == [[], []]  # more readers than shards: none read


def _loader(shards: Path, tmp_path: Path, workers: int, **batching) -> ShardLoader:
    """The CTC recipe's pipelines over the shards, as train_CTC.py builds them."""
    from train_CTC import add_pipelines

    index = read_index(shards)
    dataset = ShardDataset(index, tmp_path / "cache", 0, seed=3402, **batching)
    encoder = CTCTextEncoder()
    encoder.insert_blank(index=0)
    encoder.update_from_iterable("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ", sequence_input=False)
    encoder.ignore_len()
    add_pipelines({"sample_rate": 16000, "speed_perturb": None}, encoder, dataset, [])
    return ShardLoader(dataset, workers, collate_readable, ShardProgress(index))


def test_loader_epoch_yields_each_manifest_utterance_once(shards, rows, tmp_path) -> None:
    loader = _loader(shards, tmp_path, 2, max_batch_length=10.0, max_batch_ex=4)
    durations = {r["ID"]: float(r["duration"]) for r in rows}
    orders = []
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        ids = []
        for batch in loader:
            wavs, lens = batch.sig
            assert wavs.shape[0] == len(batch.id) <= 4 and batch.tokens[0].shape[0] == len(lens)
            assert len(batch.id) * max(durations[i] for i in batch.id) <= 10.0
            assert wavs.shape[1] == pytest.approx(16000 * max(durations[i] for i in batch.id),
                                                  abs=2)
            ids += batch.id
        assert sorted(ids) == sorted(durations) and len(ids) == N_UTTS
        assert loader.progress.done == {s.name for s in loader.dataset.index.shards}
        assert loader.epoch_stats() == {"shard_utterances": N_UTTS, "skipped_shards": 0,
                                        "dropped_batches": 0, "dropped_utterances": 0}
        orders.append(ids)
    assert orders[0] != orders[1]  # reshuffled


def test_loader_filters_long_utterances_and_counts_them_read(shards, rows, tmp_path) -> None:
    loader = _loader(shards, tmp_path, 0, batch_size=5)
    longest = sorted(float(r["duration"]) for r in rows)[-6]  # 5 utterances are longer
    loader.dataset.max_duration = longest
    ids = [i for batch in loader for i in batch.id]
    assert sorted(ids) == sorted(r["ID"] for r in rows if float(r["duration"]) <= longest)
    assert loader.progress.done == {s.name for s in loader.dataset.index.shards}


def test_other_schemes_are_downloaded_through_fsspec_and_verified(shards, tmp_path) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    index = read_index(shards)
    for s in [*index.shards[:-1], index]:  # the last shard missing
        name = INDEX_NAME if s is index else s.name
        memory.pipe(f"/shard-test/{name}", (shards.parent / name).read_bytes())
    loader = ShardLoader(ShardDataset(read_index("memory://shard-test/shards.json"),
                                      tmp_path / "cache", 0, seed=1, batch_size=4),
                         0, collate_readable, ShardProgress(index))
    loader.dataset.set_output_keys(["id"])
    ids = [i for batch in loader for i in batch.id]
    assert len(ids) == index.utterances - index.shards[-1].utterances
    assert loader.epoch_stats()["skipped_shards"] == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{s.sha256}.tar" for s in index.shards[:-1])
    memory.rm("/shard-test", recursive=True)


def test_audio_bytes_decode_and_errors_name_shard_and_utterance(rows) -> None:
    from mamba_asr.audio_io import AudioBytes, load_audio

    wav = Path(rows[0]["wav"])
    assert torch.equal(load_audio(AudioBytes(wav.read_bytes(), "s:u"), 16000),
                       load_audio(wav, 16000))
    marked = data.load_or_mark(AudioBytes(b"not audio at all", "shard-000003.tar:u-1"), 16000)
    assert marked.file == "shard-000003.tar:u-1" and "libsndfile" in marked.reason


def test_two_processes_read_disjoint_shards_and_as_many_batches(shards, rows, tmp_path) -> None:
    import shard_ddp

    torch.multiprocessing.start_processes(  # fork: the children have the modules imported
        shard_ddp.spawned, args=(2, str(shards), str(tmp_path / "store"), str(tmp_path)),
        nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    index = read_index(shards)
    assert sorted(results[0]["shards"] + results[1]["shards"]) == sorted(
        s.name for s in index.shards)
    assert not set(results[0]["shards"]) & set(results[1]["shards"])
    assert len(results[0]["batches"]) == len(results[1]["batches"]) > 0
    seen = [i for r in results for b in r["batches"] for i in b]
    assert len(seen) == len(set(seen))
    stats = results[0]["stats"]
    assert stats == results[1]["stats"]  # summed over both processes
    assert stats["shard_utterances"] == len(seen)
    assert len(seen) + stats["dropped_utterances"] == N_UTTS


# ---------------------------------------------------------------------------- recipe runs

RUN = ["--select_n_sentences", f"[{N_UTTS}, 2, 2, 2]", "--number_of_epochs", "1",
       "--num_workers", "2", "--noprogressbar"]


def _ctc_cmd(corpus: Path, out: Path, train_shards: str, *options: str) -> list[str]:
    return [sys.executable, "train_CTC.py", str(CTC_DEMO), "--data_folder", str(corpus),
            "--output_folder", str(out), "--train_shards", train_shards, *RUN, *options]


class _Counting(http.server.SimpleHTTPRequestHandler):
    requests: Counter = Counter()

    def do_GET(self) -> None:
        type(self).requests[self.path.lstrip("/")] += 1
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_recipe_trains_from_http_shards_skipping_bad_ones(shards, demo_corpus, rows,
                                                           tmp_path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    index = read_index(shards)
    for s in index.shards:
        (served / s.name).write_bytes((shards.parent / s.name).read_bytes())
    (served / INDEX_NAME).write_bytes(shards.read_bytes())
    corrupt, missing = index.shards[1].name, index.shards[4].name
    damaged = bytearray((served / corrupt).read_bytes())
    damaged[1000] ^= 0xFF
    (served / corrupt).write_bytes(bytes(damaged))
    (served / missing).unlink()

    handler = type("Handler", (_Counting,), {"requests": Counter()})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{INDEX_NAME}"
        out = tmp_path / "run"
        proc = subprocess.run(_ctc_cmd(demo_corpus, out, url, "--shard_retries", "1"),
                              cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert handler.requests[corrupt] == 2 and handler.requests[missing] == 2  # 1 retry each
    good = [s for s in index.shards if s.name not in (corrupt, missing)]
    assert all(handler.requests[s.name] == 1 for s in good)
    log = (out / "log.txt").read_text()
    for name in (corrupt, missing):
        assert re.search(rf"skipping shard {name}: shard http://127\.0\.0\.1:\d+/{name}", log)
    epoch_line = (out / "train_log.txt").read_text().splitlines()[0]
    assert "skipped_shards: 2," in epoch_line
    assert f"shard_utterances: {sum(s.utterances for s in good)}," in epoch_line
    cached = sorted(p.name for p in (out / "shard_cache").iterdir())
    assert cached == sorted(f"{s.sha256}.tar" for s in good)  # downloaded, verified, named


def _done_in_checkpoints(out: Path) -> set[str]:
    done: set[str] = set()
    for path in (out / "save").glob("CKPT+*/shard_progress.ckpt"):
        try:
            done |= set(json.loads(path.read_text())["done"])
        except (OSError, ValueError):  # being written or deleted
            pass
    return done


@pytest.mark.slow
def test_recipe_killed_mid_epoch_resumes_with_the_unread_shards(manifest, demo_corpus,
                                                                tmp_path) -> None:
    one_each = tmp_path / "shards"  # one utterance per shard: 40 shards
    index = make_shards(manifest, one_each, 0.001, str(demo_corpus))
    out = tmp_path / "run"
    cmd = _ctc_cmd(demo_corpus, out, str(one_each / INDEX_NAME), "--ckpt_interval_steps", "1",
                   "--max_batch_length_train", "10")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not _done_in_checkpoints(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    seen_done = _done_in_checkpoints(out)
    assert seen_done and not (out / "train_log.txt").exists()  # killed inside epoch 1
    first = (out / "log.txt").read_text()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = (out / "log.txt").read_text()[len(first):]
    k = int(re.search(r"resuming epoch 1: (\d+) shards already read", resumed).group(1))
    reads = re.findall(r"worker \d reads shard (shard-\d+\.tar) \(epoch 1\)", resumed)
    assert len(reads) == len(set(reads)) == len(index.shards) - k
    skipped = {s.name for s in index.shards} - set(reads)
    assert len(skipped) == k and seen_done <= skipped
    assert skipped <= set(re.findall(r"reads shard (shard-\d+\.tar)", first))
    epoch_line = (out / "train_log.txt").read_text().splitlines()[0]
    assert f"shard_utterances: {len(index.shards) - k}," in epoch_line
