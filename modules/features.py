"""Filterbank features that can be computed on a stream."""

from __future__ import annotations

import math
from typing import Any

from speechbrain.lobes.features import Fbank as SBFbank

__all__ = ["Fbank"]


class Fbank(SBFbank):
    """SpeechBrain's ``Fbank`` with its dB floor as an argument: (B, samples) -> (B, T, n_mels).

    SpeechBrain floors the log-mel energies ``top_db`` (80) dB below the loudest bin of each
    recording, so every frame depends on the whole recording. ``top_db=None`` drops that
    floor (only the fixed -100 dB floor of ``amin`` stays): each frame then depends on its own
    samples only, and a stream's features equal the whole recording's. The other arguments and
    the state are SpeechBrain's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        top_db = kwargs.pop("top_db", 80.0)  # ours; the rest are SpeechBrain's
        super().__init__(*args, **kwargs)
        self.compute_fbanks.top_db = math.inf if top_db is None else float(top_db)

    @property
    def streamable(self) -> bool:
        """Whether each frame depends on its own samples only (no per-recording floor)."""
        return not self.compute_fbanks.log_mel or math.isinf(self.compute_fbanks.top_db)
