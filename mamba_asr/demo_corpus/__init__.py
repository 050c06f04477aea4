"""The bundled synthetic demo corpus: LibriSpeech layout, eSpeak NG voices, verified checksums."""

from mamba_asr.demo_corpus.corpus import (
    PRESETS,
    SPLITS,
    CorpusMismatch,
    build,
    read_speakers,
    read_stamp,
    verify,
)

__all__ = ["PRESETS", "SPLITS", "CorpusMismatch", "build", "read_speakers", "read_stamp", "verify"]
