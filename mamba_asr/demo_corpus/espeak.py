"""Speech synthesis with the eSpeak NG library shipped in the pinned ``espeakng-loader`` wheel."""

from __future__ import annotations

import ctypes

import numpy as np

# Constants of speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


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
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise with the data in {data}")
        self.sample_rate: int = rate
        self._lib = lib
        self._libc = ctypes.CDLL(None)  # the process's libc, whose rand() eSpeak calls
        self._libc.srand.argtypes = [ctypes.c_uint]
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # C keeps only the pointer: hold it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes._Pointer, n: int, _events: int | None) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0: continue synthesis

    def synthesize(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int = 0
    ) -> np.ndarray:
        """Speak ``text`` with ``voice`` ("en-us+m3") at ``rate`` words per minute.

        ``pitch`` and ``pitch_range`` are eSpeak's 0-100 settings (50 = the voice's own).
        Returns int16 samples at ``self.sample_rate`` (22050 Hz).
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            if self._lib.espeak_SetParameter(param, int(value), 0) != 0:
                raise ValueError(f"eSpeak NG rejected parameter {param} = {value}")
        self._chunks = []
        self._lib.espeak_ng_SetRandSeed(seed & 0x7FFFFFFF)
        self._libc.srand(seed & 0xFFFFFFFF)
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        err = self._lib.espeak_Synth(
            buf, ctypes.sizeof(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        self._lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"eSpeak NG produced no audio for {text!r} (error {err})")
        return np.concatenate(self._chunks)
