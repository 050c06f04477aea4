"""``transcribe.py --stream`` on a random-weight export of the causal demo configuration, run
in-process: a file and standard input's PCM give the offline transcript of the same audio,
progress lines with their stream times on stderr, clear errors for what cannot stream."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from serving import noise_pcm

import transcribe
from mamba_asr.config import cli
from mamba_asr.transcriber import Transcriber
from mamba_asr.transcript import Transcript, render

SR = 16000
SECONDS = 4.0
LINE = re.compile(r"^ *(\d+\.\d\d) s  (\u2026 )?(\S.*)$")


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return noise_pcm(SECONDS)


@pytest.fixture(scope="module")
def noise_wav(tmp_path_factory: pytest.TempPathFactory, pcm: bytes) -> Path:
    """4 s of low-level noise, 16-bit 16-kHz WAV (the random model hears ~10 words in it)."""
    path = tmp_path_factory.mktemp("audio") / "noise.wav"
    sf.write(path, np.frombuffer(pcm, "<i2"), SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def offline(stream_export_words: Path, noise_wav: Path) -> Transcript:
    """The plain (offline) transcription of the file by the same model."""
    return Transcriber.from_folder(stream_export_words).transcribe_file(noise_wav)


def run(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        stdin: bytes | None = None) -> tuple[int, str, str]:
    """transcribe.py as its command line runs it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["transcribe.py", *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as stop:
        cli(transcribe.main)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def progress(err: str) -> list[tuple[float, bool, str]]:
    """The progress lines of stderr: (stream time, is a partial, text)."""
    lines = []
    for line in err.splitlines():
        m = LINE.match(line)
        if m:
            lines.append((float(m[1]), m[2] is not None, m[3]))
    return lines


def test_file_streams_to_the_offline_transcript(stream_export_words, noise_wav, offline,
                                                capsys, monkeypatch) -> None:
    """Partials and final words on stderr at 160-ms stream times; stdout's JSON is the
    offline transcript (text and word times)."""
    assert len(offline.words) >= 5 and len(offline.text) >= 20  # a strong comparison
    status, out, err = run([str(stream_export_words), "--stream", str(noise_wav),
                            "--stream_speed", "0"], capsys, monkeypatch)
    assert status == 0, err
    result = json.loads(out)
    assert result["text"] == offline.text
    got = [(w["word"], w["start"], w["end"]) for w in result["words"]]
    assert got == [(w.word, pytest.approx(w.start, abs=1e-3), pytest.approx(w.end, abs=1e-3))
                   for w in offline.words]
    lines = progress(err)
    assert len(lines) == len(err.splitlines())  # nothing else on stderr
    times = [t for t, _, _ in lines]
    assert times == sorted(times) and times[-1] <= SECONDS
    assert all(round(t / 0.16, 6).is_integer() for t in times[:-1])  # fed 160 ms at a time
    partials = [text for _, is_partial, text in lines if is_partial]
    finals = [text for _, is_partial, text in lines if not is_partial]
    assert len(partials) >= 3
    assert any(t < SECONDS for t, is_partial, _ in lines if not is_partial)  # final early
    assert " ".join(finals) == offline.text  # every word once, in order


def test_other_rate_is_resampled_and_paced(stream_export_words, noise_wav, capsys,
                                           monkeypatch, tmp_path) -> None:
    """A 44.1-kHz stereo file streams (resampled as without --stream) to the plain command's
    txt output; --stream_speed 10 takes at least a tenth of the audio's duration; --quiet
    prints no progress."""
    wav, _ = sf.read(noise_wav, dtype="float32")
    cd = torchaudio.functional.resample(torch.from_numpy(wav), SR, 44100).numpy()
    stereo = tmp_path / "cd.wav"
    sf.write(stereo, np.stack([cd, cd], axis=1), 44100, subtype="PCM_16")
    status, plain, _ = run([str(stream_export_words), str(stereo), "-f", "txt"], capsys,
                           monkeypatch)
    assert status == 0 and plain.strip()
    start = time.monotonic()
    status, out, err = run([str(stream_export_words), "--stream", str(stereo), "--stream_speed",
                            "10", "--chunk_ms", "500", "-f", "txt", "--quiet"], capsys,
                           monkeypatch)
    assert time.monotonic() - start >= SECONDS / 10
    assert status == 0, err
    assert out == plain
    assert err == ""


def test_stdin_pcm_streams_to_the_offline_transcript(stream_export_words, pcm, offline, capsys,
                                                     monkeypatch, tmp_path) -> None:
    """``--stream -`` reads raw PCM (an odd --chunk_ms) to the same transcript, written as
    stdin.<format> with --output_dir; an odd byte count at EOF: one error line, exit 1, the
    transcript still written."""
    out_dir = tmp_path / "out"
    status, out, err = run([str(stream_export_words), "--stream", "-", "--chunk_ms", "70",
                            "-o", str(out_dir), "-f", "txt"], capsys, monkeypatch, stdin=pcm)
    assert status == 0, err
    assert out == ""
    assert (out_dir / "stdin.txt").read_text() == render(offline, "txt")
    times = [t for t, _, _ in progress(err)]
    assert times and all(round(t / 0.07, 6).is_integer() for t in times[:-1])

    status, out, err = run([str(stream_export_words), "--stream", "-", "-f", "json"], capsys,
                           monkeypatch, stdin=pcm + b"\x01")
    assert status == 1
    assert json.loads(out)["text"] == offline.text
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: <stdin>: {len(pcm) + 1} bytes is not a whole number of 16-bit "
                      "samples (the input ended inside a sample; its last byte was dropped)"]


def test_what_cannot_stream_is_one_error_line(random_export, stream_export_words, noise_wav,
                                              capsys, monkeypatch) -> None:
    """The bidirectional demo model, other inputs beside --stream, an empty standard input."""
    status, out, err = run([str(random_export), "--stream", str(noise_wav)], capsys,
                           monkeypatch)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {random_export}: the model cannot stream: ")
    status, _, err = run([str(stream_export_words), str(noise_wav), "--stream", str(noise_wav)],
                         capsys, monkeypatch)
    assert status == 2 and err.startswith("error: --stream reads its own audio")
    status, out, err = run([str(stream_export_words), "--stream", "-"], capsys, monkeypatch,
                           stdin=b"")
    assert status == 1 and out == ""
    assert err == "error: <stdin>: no audio (raw 16-bit PCM, 0 bytes)\n"
