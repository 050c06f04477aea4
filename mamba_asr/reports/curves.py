r"""Training curves (PNG) from SpeechBrain ``train_log.txt`` files.

A ``train_log.txt`` is written by ``speechbrain.utils.train_logger.FileTrainLogger.log_stats``,
one line per call: ``epoch: 3, lr: 1.00e-03 - train loss: 2.91 - valid loss: 2.55, valid CER:
80.12, valid WER: 99.10`` (evaluation adds ``Epoch loaded: 10 - test loss: ..., test WER: ...``).
A resumed run may log an epoch again: the last occurrence wins.

Usage:
    python -m mamba_asr.reports.curves results/conmamba/7775/train_log.txt --out curves.png
    python -m mamba_asr.reports.curves results/a/7775/train_log.txt results/b/7775/train_log.txt \
        --labels a b --out compare.png --logy
    python -m mamba_asr.reports.curves train_log.txt --losses "train loss" --rates "valid WER" \
        --out wer.png
    python -m mamba_asr.reports.curves train_log.txt --out stats.png \
        --stats grad_norm_max audio_s_per_s_total peak_mem_gb    # one more panel each

The recipes' epoch lines also hold the training statistics of
:mod:`mamba_asr.training_monitor` (``grad_norm_mean``, ``grad_norm_max``, ``clipped_steps``,
``audio_s_per_s_total`` or ``tokens_per_s_total``, ``peak_mem_gb``, ``eta``): ``--stats``
draws the numeric ones below the losses and rates.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from mamba_asr.reports._common import ReportError, read_text, report_error

LOSSES = ("train loss", "valid loss")
RATES = ("valid WER", "valid CER")


def is_accuracy(column: str) -> bool:
    """Accuracy columns (``valid ACC``, logged as a fraction): higher is better, drawn in %."""
    return column.split()[-1].upper() == "ACC"


def _rate(df: pd.DataFrame, column: str) -> pd.Series:
    """``column`` as numbers in %, epochs without a value dropped."""
    values = pd.to_numeric(df.get(column, pd.Series(dtype=float)), errors="coerce").dropna()
    return values * 100 if is_accuracy(column) else values


_LOG_FORMAT = (
    "SpeechBrain FileTrainLogger lines like "
    "'epoch: 1, lr: 1.00e-03 - train loss: 2.91 - valid loss: 2.55, valid WER: 99.10'"
)


def _value(text: str) -> int | float | str:
    """``'3'`` -> 3, ``'1.00e-03'`` -> 0.001, anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_log_line(line: str) -> dict[str, int | float | str] | None:
    """``{key: value}`` of one ``log_stats`` line; None when it is not ``key: value, ...``.

    ``'epoch: 1, lr: 1.00e-03 - train loss: 2.91'`` -> ``{'epoch': 1, 'lr': 0.001,
    'train loss': 2.91}``. Groups are separated by ``' - '``, items by ``', '``; an item
    without ``': '`` continues the previous value (a string value that held ``', '``).
    """
    stats: dict[str, int | float | str] = {}
    last = None
    for group in line.strip().split(" - "):
        for item in group.split(", "):
            key, sep, text = item.partition(": ")
            if sep and key.strip():
                last = key.strip()
                stats[last] = _value(text.strip())
            elif last is None:
                return None
            else:
                stats[last] = f"{stats[last]}, {item}"
    return stats


def _stat_lines(path: str | Path) -> Iterator[tuple[int, dict[str, int | float | str]]]:
    """``(line number, stats)`` of every ``key: value`` line of a train log."""
    for lineno, line in enumerate(read_text(path, _LOG_FORMAT).splitlines(), start=1):
        stats = parse_log_line(line) if line.strip() else None
        if stats:
            yield lineno, stats


def read_train_log(path: str | Path) -> pd.DataFrame:
    """Per-epoch statistics of a ``train_log.txt``.

    Returns a DataFrame indexed by ``epoch`` (int, ascending) with one column per logged key
    as written (``'lr'``, ``'train loss'``, ``'valid WER'``, ...); numbers are int/float,
    other values strings, keys missing from an epoch NaN. A repeated epoch (resumed run)
    keeps its last line; ``Epoch loaded`` test lines are left out (see ``read_test_lines``).
    Raises ReportError for an unreadable file or one without epoch lines.
    """
    rows: dict[int, dict[str, int | float | str]] = {}
    for lineno, stats in _stat_lines(path):
        key = next(iter(stats))
        if key.lower() != "epoch":
            continue
        epoch = stats.pop(key)
        if not isinstance(epoch, int | float) or epoch != int(epoch):
            raise ReportError(f"{path}:{lineno}: epoch {epoch!r} is not an integer")
        rows[int(epoch)] = stats
    if not rows:
        raise ReportError(f"{path}: no epoch lines found (expected {_LOG_FORMAT})")
    df = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    df.index.name = "epoch"
    return df


def read_test_lines(path: str | Path) -> pd.DataFrame:
    """The ``Epoch loaded: N - test ...`` lines of a ``train_log.txt``, in file order.

    Returns a DataFrame with a ``line`` column (1-based line number) and one column per
    logged key (``'Epoch loaded'``, ``'test loss'``, ``'test WER'``, ...); empty (no rows)
    when the log has none. SpeechBrain does not log the test-set name: in the LibriSpeech
    recipes the lines follow the order of the ``test_csv`` list.
    """
    rows = [
        {"line": lineno, **stats}
        for lineno, stats in _stat_lines(path)
        if next(iter(stats)).lower() == "epoch loaded"
    ]
    return pd.DataFrame(rows, columns=None if rows else ["line"])


def plot_curves(
    logs: Sequence[tuple[str, pd.DataFrame]],
    out: str | Path,
    losses: Sequence[str] = LOSSES,
    rates: Sequence[str] = RATES,
    logy: bool = False,
    title: str | None = None,
    stats: Sequence[str] = (),
) -> Path:
    """Write a PNG of two panels: ``losses`` (top) and ``rates`` in % (bottom) against epoch:
    error rates, and accuracies (``valid ACC``, logged as fractions) times 100; then one panel
    per column of ``stats`` (a training statistic, e.g. ``grad_norm_max``), on its own scale.

    ``logs`` holds ``(label, read_train_log(...))`` pairs, overlaid in colours C0, C1, ...;
    columns a log lacks are skipped, NaN epochs (e.g. WER only every N epochs) dropped.
    Raises ValueError when a log has none of the requested columns.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 7 + 2.2 * len(stats)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_rate, *ax_stats = fig.subplots(2 + len(stats), 1, sharex=True)
    styles = ["-", "--", ":", "-."]
    panels = [(ax_loss, losses), (ax_rate, rates), *((ax, [c]) for ax, c in zip(
        ax_stats, stats, strict=True))]
    for i, (label, df) in enumerate(logs):
        drawn = 0
        for ax, columns in panels:
            for j, column in enumerate(columns):
                if column not in df.columns:
                    continue
                if ax is ax_rate:
                    values = _rate(df, column)
                else:
                    values = pd.to_numeric(df[column], errors="coerce").dropna()
                if values.empty:
                    continue
                name = column if len(logs) == 1 else f"{label}: {column}"
                ax.plot(
                    values.index,
                    values.to_numpy(),
                    styles[j % len(styles)],
                    color=f"C{i % 10}",
                    marker="o",
                    markersize=3,
                    label=name,
                )
                drawn += 1
        if not drawn:
            wanted = ", ".join([*losses, *rates])
            raise ValueError(f"{label}: none of the columns {wanted} has a value")
    rate_label = "rate (%)" if any(map(is_accuracy, rates)) else "error rate (%)"
    labels = [(ax_loss, "loss", losses), (ax_rate, rate_label, rates)]
    labels += [(ax, column, [column]) for ax, column in zip(ax_stats, stats, strict=True)]
    for ax, ylabel, columns in labels:
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            message = f"no {' / '.join(columns)} logged"
            ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    if logy and ax_loss.lines:
        ax_loss.set_yscale("log")
    bottom = ax_stats[-1] if ax_stats else ax_rate
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


def summary(label: str, df: pd.DataFrame, rates: Sequence[str] = RATES) -> str:
    """One line per log: epoch range and the best value of each rate column (lowest error
    rate, highest accuracy, in %)."""
    text = f"{label}: {len(df)} epochs ({df.index.min()}-{df.index.max()})"
    for column in rates:
        values = _rate(df, column)
        if not values.empty:
            epoch = values.idxmax() if is_accuracy(column) else values.idxmin()
            text += f", best {column} {values[epoch]:.2f} at epoch {epoch}"
    return text


def default_labels(paths: Sequence[Path]) -> list[str]:
    """Each log's folder minus the folders all logs share (``a/7775``, ``b/7775``); the paths
    as given when that does not tell the logs apart."""
    parents = [p.resolve().parent for p in paths]
    if len(parents) == 1:
        return [parents[0].name]
    common = Path(os.path.commonpath(parents))
    labels = [str(p.relative_to(common)) if p != common else p.name for p in parents]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_asr.reports.curves",
        description="Plot losses and error rates per epoch from SpeechBrain train_log.txt files.",
        epilog="Several logs are overlaid (one colour each); a repeated epoch keeps its last line.",
    )
    parser.add_argument("logs", nargs="+", type=Path, help="train_log.txt file(s)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG (%(default)s)")
    parser.add_argument("--labels", nargs="+", help="one legend label per log (default: folders)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), help="top panel columns")
    parser.add_argument("--rates", nargs="+", default=list(RATES), help="bottom panel columns")
    parser.add_argument("--stats", nargs="+", default=[],
                        help="training statistics, one panel each (e.g. grad_norm_max "
                             "audio_s_per_s_total peak_mem_gb clipped_steps)")
    parser.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        parser.error(f"--labels has {len(args.labels)} labels for {len(args.logs)} logs")
    labels = args.labels or default_labels(args.logs)
    logs = []
    try:
        for label, path in zip(labels, args.logs, strict=True):
            df = read_train_log(path)
            missing = [c for c in args.stats if c not in df.columns]
            if missing:
                raise ReportError(f"{path}: no {', '.join(map(repr, missing))} in its epoch "
                                  "lines (written by the recipes since their training "
                                  "statistics)")
            if not set(df.columns) & {*args.losses, *args.rates}:
                wanted = ", ".join(map(repr, [*args.losses, *args.rates]))
                raise ReportError(f"{path}: no {wanted} values in its epoch lines")
            logs.append((label, df))
    except ReportError as e:
        return report_error(e)
    out = plot_curves(logs, args.out, args.losses, args.rates, args.logy, args.title, args.stats)
    for label, df in logs:
        print(summary(label, df, args.rates))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
