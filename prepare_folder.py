#!/usr/bin/env python3
"""Prepare a CSV manifest (ID,duration,wav,spk_id,wrd) of your own corpus for the recipes.

Usage:
    python prepare_folder.py my_corpus/train --out results/my_prep --name train
    python prepare_folder.py my_corpus/dev.tsv --out results/my_prep --name dev \
        --hparams hparams/CTC/demo.yaml --resample results/my_16k
    python prepare_folder.py --help

    from prepare_folder import prepare_folder
    prepare_folder("my_corpus/train", "results/my_prep", name="train")

A corpus is a folder of audio files with same-named ``.txt`` transcripts, or a TSV of
``path<TAB>text[<TAB>speaker]`` lines; the code, and the table of how problems in the data are
handled, are in ``mamba_asr/folder_corpus.py``.
"""

from __future__ import annotations

import sys

from mamba_asr.folder_corpus import FolderManifest, FolderPrepError, main, prepare_folder

__all__ = ["FolderManifest", "FolderPrepError", "main", "prepare_folder"]

if __name__ == "__main__":
    sys.exit(main())
