"""The bundled synthetic demo corpus: LibriSpeech layout, eSpeak NG voices, word times,
verified checksums."""

from mamba_asr.demo_corpus.corpus import (
    ADAPT_SPLITS,
    PRESETS,
    SPLITS,
    CorpusMismatch,
    build,
    read_speakers,
    read_stamp,
    verify,
)
from mamba_asr.demo_corpus.word_times import WordTimesError, read_word_times

__all__ = [
    "ADAPT_SPLITS",
    "PRESETS",
    "SPLITS",
    "CorpusMismatch",
    "WordTimesError",
    "build",
    "read_speakers",
    "read_stamp",
    "read_word_times",
    "verify",
]
