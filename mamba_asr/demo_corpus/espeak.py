"""Speech synthesis with the eSpeak NG library shipped in the pinned ``espeakng-loader`` wheel
(eSpeak NG 1.52.0), with the engine's word and phoneme events."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

# Constants of speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS, _INITIALIZE_PHONEME_IPA = 0x0001, 0x0002
_INITIALIZE_DONT_EXIT = 0x8000
_PHONEMES_IPA = 0x02
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_PHONEME = 0, 1, 7  # espeak_EVENT_TYPE


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` as speak_lib.h of eSpeak NG 1.52 lays it out."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position in the text
        ("length", ctypes.c_int),  # characters of the word (WORD events)
        ("audio_position", ctypes.c_int),  # ms from the start of the synthesised audio
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class WordEvent(NamedTuple):
    """Where eSpeak starts speaking a word: ``text[offset : offset + length]`` at ``ms``."""

    offset: int  # 0-based character offset in the synthesised text
    length: int
    ms: int  # milliseconds from the first sample eSpeak returned


class PhonemeEvent(NamedTuple):
    """Where eSpeak places a phoneme (IPA ``name``) in its output."""

    name: str
    ms: int
    word: int  # index of the last word event before it; -1 before the first


class Speech(NamedTuple):
    """One synthesised text: (samples,) int16 at the engine's rate and its events in order."""

    samples: np.ndarray
    words: list[WordEvent]
    phonemes: list[PhonemeEvent]


class ESpeak:
    """One eSpeak NG engine in synchronous mode (the library has global state: one per process).

    The engine also carries state from one utterance to the next (noise and flutter phases),
    so callers that need reproducible audio synthesise each utterance from the same state,
    e.g. in a forked child of a process whose engine has not spoken yet. Breathy variants
    (f2, f3, f5, ...) draw noise from eSpeak's random generator, which it seeds from the
    clock: ``synthesize`` reseeds it (and libc's ``rand()``) with its ``seed`` argument.
    """

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        lib.espeak_TextToPhonemes.argtypes = [
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data = espeakng_loader.get_data_path()
        options = _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA | _INITIALIZE_DONT_EXIT
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), options)
        if rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise with the data in {data}")
        self.sample_rate: int = rate
        self._lib = lib
        self._libc = ctypes.CDLL(None)  # the process's libc, whose rand() eSpeak calls
        self._libc.srand.argtypes = [ctypes.c_uint]
        self._chunks: list[np.ndarray] = []
        self._words: list[WordEvent] = []
        self._phonemes: list[PhonemeEvent] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # C keeps only the pointer: hold it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes._Pointer, n: int, events: ctypes._Pointer) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        k = 0
        while events and events[k].type != _EVENT_LIST_TERMINATED:
            event = events[k]
            if event.type == _EVENT_WORD:
                self._words.append(
                    WordEvent(event.text_position - 1, event.length, event.audio_position)
                )
            elif event.type == _EVENT_PHONEME:
                name = event.id.string.decode("utf-8", "replace")
                self._phonemes.append(
                    PhonemeEvent(name, event.audio_position, len(self._words) - 1)
                )
            k += 1
        return 0  # 0: continue synthesis

    def synthesize(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int = 0
    ) -> Speech:
        """Speak ``text`` with ``voice`` ("en-us+m3") at ``rate`` words per minute.

        ``pitch`` and ``pitch_range`` are eSpeak's 0-100 settings (50 = the voice's own).
        Returns int16 samples at ``self.sample_rate`` (22050 Hz) and the word and phoneme
        events, in order (ASCII ``text``: character offsets are byte offsets).
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            if self._lib.espeak_SetParameter(param, int(value), 0) != 0:
                raise ValueError(f"eSpeak NG rejected parameter {param} = {value}")
        self._chunks, self._words, self._phonemes = [], [], []
        self._lib.espeak_ng_SetRandSeed(seed & 0x7FFFFFFF)
        self._libc.srand(seed & 0xFFFFFFFF)
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        err = self._lib.espeak_Synth(
            buf, ctypes.sizeof(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        self._lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"eSpeak NG produced no audio for {text!r} (error {err})")
        return Speech(np.concatenate(self._chunks), self._words, self._phonemes)

    def phonemes(self, word: str) -> list[str]:
        """The IPA phonemes eSpeak gives ``word`` alone with the current voice, named as
        in phoneme events (stress marks on their vowels)."""
        text = ctypes.c_char_p(word.encode("utf-8"))
        names: list[str] = []
        while text.value:
            out = self._lib.espeak_TextToPhonemes(
                ctypes.byref(text), _CHARS_UTF8, _PHONEMES_IPA | ord("_") << 8
            )
            names += (out or b"").decode("utf-8").replace(" ", "_").split("_")
        return [name for name in names if name]
