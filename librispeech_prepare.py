#!/usr/bin/env python3
"""Prepare LibriSpeech CSV manifests (ID,duration,wav,spk_id,wrd) for the SpeechBrain recipes.

Usage:
    python librispeech_prepare.py --data_folder /data/LibriSpeech --save_folder results/prepared \
        --tr_splits train-clean-100 train-clean-360 train-other-500 \
        --dev_splits dev-clean dev-other --te_splits test-clean test-other \
        --merge_lst train-clean-100 train-clean-360 train-other-500 --merge_name train.csv
    python librispeech_prepare.py --help

    from librispeech_prepare import prepare_librispeech
    prepare_librispeech("/data/LibriSpeech", "results/prepared", tr_splits=["train-clean-100"])

The entry point of SpeechBrain's recipes (same function, same import path); the code and the
table of how problems in the data are handled are in ``mamba_asr/librispeech.py``.
"""

from __future__ import annotations

import sys

from mamba_asr.librispeech import (
    LibriSpeechPrepError,
    librispeech_root,
    main,
    prepare_librispeech,
    summarize,
)

__all__ = ["LibriSpeechPrepError", "librispeech_root", "main", "prepare_librispeech", "summarize"]

if __name__ == "__main__":
    sys.exit(main())
