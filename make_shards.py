#!/usr/bin/env python3
"""Write a training manifest as WebDataset tar shards plus their index ``shards.json``,
for ``train_shards`` (docs/data.md).

Usage:
    python make_shards.py results/.../prepared/train.csv --out shards/train --data_folder data
    python make_shards.py train.csv --out shards/train --shard_size_mb 256 --overwrite
"""

from __future__ import annotations

import argparse
import logging

from mamba_asr.shards.writer import make_shards


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, write the shards, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="CSV manifest (ID,duration,wav,spk_id,wrd)")
    parser.add_argument("--out", required=True, help="folder for the shards and shards.json")
    parser.add_argument("--shard_size_mb", type=float, default=256,
                        help="audio bytes per shard, at most (default 256)")
    parser.add_argument("--data_folder", default=None,
                        help="the LibriSpeech folder the manifest's $data_root stands for")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards of an existing shards.json in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index = make_shards(args.manifest, args.out, args.shard_size_mb, args.data_folder,
                            args.overwrite)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"make_shards.py: {exc}") from None
    print(f"{len(index.shards)} shards, {index.utterances} utterances, "
          f"{index.seconds / 3600:.2f} h: {index.location}")


if __name__ == "__main__":
    main()
