"""Command line of the demo corpus synthesiser.

    python -m mamba_asr.demo_corpus --out data/demo             # build once, then a no-op
    python -m mamba_asr.demo_corpus --out data/demo --verify    # re-hash an existing corpus
    python -m mamba_asr.demo_corpus --out tests/data/tiny --preset tiny --no-stamp
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def summary(info: dict) -> str:
    """Per-split table of a build's statistics."""
    lines = [f"{'split':<16} {'utterances':>10} {'hours':>6} {'speakers':>8}  voices"]
    for split, s in info["splits"].items():
        lines.append(
            f"{split:<16} {s['utterances']:>10} {s['hours']:>6.3f} {s['speakers']:>8}  "
            + " ".join(s["voices"])
        )
    lines.append(
        f"{'total':<16} {info['utterances']:>10} {info['hours']:>6.3f}"
        f"{'':>10}  vocabulary: {info['vocabulary']} words"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build or verify; returns the exit status."""
    from mamba_asr.demo_corpus.corpus import PRESETS, CorpusMismatch, build, verify

    parser = argparse.ArgumentParser(
        prog="python -m mamba_asr.demo_corpus",
        description="Synthesise the Mamba-ASR demo corpus with the pinned eSpeak NG engine, in "
        "LibriSpeech layout: OUT/LibriSpeech/{train-clean-100,dev-clean,test-clean,test-other,"
        "adapt-train,adapt-dev,adapt-test}/<speaker>/<chapter>/, 16 kHz FLAC, transcripts and "
        "word times (<speaker>-<chapter>.words.tsv), plus SPEAKERS.TXT. Every file is verified "
        "against the committed checksums; a finished build is recorded in OUT/demo_corpus.json "
        "and later runs are no-ops (a corpus of an older version is rebuilt).",
    )
    parser.add_argument("--out", required=True, help="folder that receives LibriSpeech/")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="demo (default): 4,280 utterances, 2.3 h, of which 3,040 and 1.7 h in "
        "train-clean-100 and 460 in the adapt splits; tiny: 2 speakers x 3 short utterances "
        "per LibriSpeech split and 4 adapt utterances, for unit tests",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="synthesis processes (default: min(2, CPU cores))",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already present")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-hash the existing corpus against the record instead of building",
    )
    parser.add_argument(
        "--no-stamp",
        action="store_true",
        help="do not write OUT/demo_corpus.json (for the committed tiny test corpus)",
    )
    parser.add_argument(
        "--write-checksums",
        action="store_true",
        help="maintainers: rebuild and overwrite the committed checksums_<preset>.tsv",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    if args.verify:
        start = time.perf_counter()
        problems = verify(args.out, args.preset)
        if problems:
            print(
                f"error: {args.out}/LibriSpeech differs from the checksum record "
                f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:50]),
                file=sys.stderr,
            )
            return 1
        print(
            f"{args.out}/LibriSpeech: every file matches the checksum record "
            f"({time.perf_counter() - start:.1f} s)"
        )
        return 0

    try:
        info = build(
            args.out,
            args.preset or "demo",
            workers=args.workers,
            force=args.force,
            write_checksums=args.write_checksums,
            stamp=not args.no_stamp,
        )
    except (CorpusMismatch, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if info.get("already_present"):
        print(
            f"demo corpus ({info['preset']}) already present in {args.out} "
            f"(synthesised in {info['seconds']} s); --force rebuilds it"
        )
    else:
        action = "recorded checksums of" if args.write_checksums else "verified"
        print(
            f"synthesised {args.out}/LibriSpeech ({info['preset']}) in {info['seconds']} s "
            f"with {info['workers']} worker(s); {action} every file"
        )
    print(summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
