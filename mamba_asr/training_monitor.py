"""What a training run is doing: gradient norms, throughput, memory, ETA, TensorBoard, and the
divergence stop (:class:`TrainingMonitor`, driven by the hooks of
:class:`mamba_asr.brain.TrainingBrain`).

Per epoch (the fields of the ``train_log.txt`` line) and, with ``log_interval_steps: N``, every
N optimizer steps (one ``log.txt`` line):

* ``grad_norm_mean``, ``grad_norm_max``: the total gradient norm before clipping over the
  optimizer steps taken (steps skipped as non-finite are left out: ``skipped_steps``);
  ``clipped_steps``: how many of them exceeded ``max_grad_norm``;
* ``<unit>_per_s``: the work trained per wall-clock second of the training stage, by this
  process (under DDP every process's, space-separated), and ``<unit>_per_s_total`` summed over
  the processes: ``audio_s`` (seconds of audio) in the ASR recipes, ``tokens`` in the LM's;
* ``peak_mem_gb``: the peak device memory (10^9 bytes) of the stage, the largest of the
  processes: CUDA ``max_memory_allocated``, otherwise the peak resident set size (``VmHWM``,
  reset at every stage and interval where Linux allows it);
* ``eta``: the time to the end of the last epoch (``H:MM:SS``): the mean wall time of the
  epochs run so far (training + validation) times the epochs left; within an epoch, the time
  per batch times the batches left (when the loader has a length).

``tensorboard: True`` writes the same scalars, plus learning rate, losses and valid stats, to
``<output_folder>/tensorboard`` (main process), with the optimizer step as x value;
a resumed run opens its writer with ``purge_step`` = its optimizer step + 1, so TensorBoard's
reader discards what a crashed run wrote after the checkpoint it resumed from.

Divergence: the valid loss rising ``divergence_patience`` evaluations in a row (a non-finite loss
counts as a rise), or ``max_consecutive_nonfinite`` skipped steps in a row, raise
:class:`TrainingDiverged`: one line naming the last good checkpoint, the gradient-norm history
and how to resume. The monitor's history is saved in every checkpoint (``training_monitor``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import if_main_process

from mamba_asr.collectives import gather
from mamba_asr.command_line import ConfigError

logger = logging.getLogger(__name__)

GB = 1e9
RECENT_NORMS = 10  # step norms kept for the non-finite stop's message
HISTORY_SHOWN = 5  # epochs of gradient-norm history in the divergence message


class TrainingDiverged(RuntimeError):
    """Training diverged: the message (one line) names the checkpoint to resume from."""


# --------------------------------------------------------------------------- small functions


def rising_evaluations(losses: Sequence[float]) -> int:
    """How many of the last evaluations were each higher than the one before: a non-finite
    loss counts as higher, and as +inf for the next one (a finite loss after it is a fall).

    ``[3, 2, 2.5, 2.7]`` -> 2; ``[3, 2, nan]`` -> 1; ``[3, nan, 2]`` -> 0; ``[]`` -> 0.
    """
    count = 0
    for prev, cur in zip(losses[-2::-1], losses[::-1], strict=False):
        cur_f = cur if math.isfinite(cur) else math.inf
        prev_f = prev if math.isfinite(prev) else math.inf
        if cur_f == math.inf or cur_f > prev_f:
            count += 1
        else:
            break
    return count


def format_eta(seconds: float) -> str:
    """``3725.2`` -> ``'1:02:05'`` (hours unbounded: ``'49:00:00'``)."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def parse_eta(text: str) -> int:
    """``'1:02:05'`` -> 3725 (the inverse of :func:`format_eta`)."""
    hours, minutes, seconds = (int(part) for part in str(text).split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _rss_peak_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` (Linux), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_bytes(device: str | torch.device) -> int:
    """Peak memory of ``device`` since :func:`reset_peak_memory`: CUDA allocated, else RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _rss_peak_bytes()


def reset_peak_memory(device: str | torch.device) -> None:
    """Starts a new peak: CUDA's statistics, or Linux's ``VmHWM`` (``clear_refs`` 5) when the
    process may write it (otherwise the peak is that of the whole process)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --------------------------------------------------------------------------- statistics


@dataclass
class Window:
    """Sums over an epoch or a logging interval (this process)."""

    norm_sum: float = 0.0
    norm_count: int = 0
    norm_max: float = 0.0
    clipped: int = 0
    amount: float = 0.0  # work trained (audio seconds, tokens)
    batches: int = 0
    seconds: float = 0.0  # wall-clock training time (time.perf_counter)

    def add_norm(self, norm: float, clipped: bool) -> None:
        self.norm_sum += norm
        self.norm_count += 1
        self.norm_max = max(self.norm_max, norm)
        self.clipped += int(clipped)

    def stats(self, unit: str | None, peak_bytes: int) -> dict[str, Any]:
        """The window's fields (all processes: call on every one), in log order."""
        per_process = gather((self.amount / self.seconds if self.seconds > 0 else 0.0,
                              peak_bytes))
        out: dict[str, Any] = {}
        if self.norm_count:
            out["grad_norm_mean"] = self.norm_sum / self.norm_count
            out["grad_norm_max"] = self.norm_max
        out["clipped_steps"] = self.clipped
        if unit is not None:
            rates = [rate for rate, _ in per_process]
            out[f"{unit}_per_s"] = (
                rates[0] if len(rates) == 1 else " ".join(f"{r:.1f}" for r in rates)
            )
            out[f"{unit}_per_s_total"] = float(sum(rates))
        out["peak_mem_gb"] = max(peak for _, peak in per_process) / GB
        return out


@dataclass
class EpochRecord:
    """One epoch of the monitor's history (kept in every checkpoint)."""

    epoch: int
    grad_norm_mean: float | None
    grad_norm_max: float | None
    valid_loss: float | None = None
    seconds: float | None = None  # wall time, training + validation; None: a partial epoch
    valid_seconds: float | None = None


@dataclass
class MonitorSettings:
    """The YAML keys the monitor reads."""

    log_interval_steps: int = 0
    tensorboard: bool = False
    divergence_patience: int | None = None

    def __post_init__(self) -> None:
        n = self.log_interval_steps
        if type(n) is not int or n < 0:
            raise ConfigError(f"log_interval_steps must be an integer >= 0 (0: per epoch "
                              f"only), not {n!r}")
        if type(self.tensorboard) is not bool:
            raise ConfigError(f"tensorboard must be True or False, not {self.tensorboard!r}")
        p = self.divergence_patience
        if p is not None and (type(p) is not int or p < 1):
            raise ConfigError(f"divergence_patience must be null (never stop) or an integer "
                              f">= 1, not {p!r}")


@dataclass
class _State:
    """What a checkpoint keeps: the history and the current epoch's window."""

    history: list[EpochRecord] = field(default_factory=list)
    window: Window = field(default_factory=Window)


@register_checkpoint_hooks
class TrainingMonitor:
    """The statistics of one run (see the module docstring).

    ``unit``: the name of the work :meth:`batch_done` counts (``audio_s``, ``tokens``; None: no
    throughput). ``tensorboard_dir``: where the main process writes event files (None: off).
    """

    def __init__(
        self,
        settings: MonitorSettings,
        unit: str | None = None,
        tensorboard_dir: str | Path | None = None,
    ) -> None:
        self.settings = settings
        self.unit = unit
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        self.state = _State()
        self.interval = Window()
        self.recent_norms: deque[float] = deque(maxlen=RECENT_NORMS)
        self.writer: Any = None
        self.epoch_stats: dict[str, Any] = {}
        self._device: str | torch.device = "cpu"
        self._epoch = 0
        self._epoch_start = 0.0
        self._valid_start: float | None = None
        self._partial = False
        self._clock_start: float | None = None  # the running span of training time
        self._peak_bytes = 0
        self._eta: float | None = None  # seconds, as last logged

    # ------------------------------------------------------------------ checkpoints

    @mark_as_saver
    def save(self, path: str | Path) -> None:
        """The history and the current epoch's window (its training time so far), as JSON."""
        state = asdict(self.state)
        if self._clock_start is not None:
            state["window"]["seconds"] += time.perf_counter() - self._clock_start
        Path(path).write_text(json.dumps(state), encoding="utf-8")

    @mark_as_loader
    def load(self, path: str | Path, end_of_epoch: bool = True) -> None:
        """Restores what :meth:`save` wrote (a mid-epoch checkpoint: the epoch so far)."""
        del end_of_epoch
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        self.state = _State(
            history=[EpochRecord(**record) for record in saved["history"]],
            window=Window(**saved["window"]),
        )

    # ------------------------------------------------------------------ the training loop

    def open_tensorboard(self, optimizer_step: int) -> None:
        """The main process's ``SummaryWriter``, discarding events after ``optimizer_step``
        (those of a run that crashed after its last checkpoint)."""
        if not self.settings.tensorboard or self.tensorboard_dir is None:
            return
        if not if_main_process() or self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=optimizer_step + 1)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def start_epoch(self, epoch: int, device: str | torch.device, resumed_mid_epoch: bool) -> None:
        """Training stage start. ``resumed_mid_epoch``: the window restored from an intra-epoch
        checkpoint goes on; the epoch's wall time is then not a whole epoch's."""
        self._device = device
        if not resumed_mid_epoch:
            self.state.window = Window()
        self._epoch = epoch
        self._partial = resumed_mid_epoch
        self.interval = Window()
        self._peak_bytes = 0
        reset_peak_memory(device)
        self._epoch_start = time.perf_counter()
        self._start_clock()

    def record_norm(self, norm: float, max_norm: float) -> None:
        """The total gradient norm (before clipping) of an optimizer step; a non-finite one
        only joins the recent norms (its step is skipped)."""
        self.recent_norms.append(norm)
        if not math.isfinite(norm):
            return
        clipped = 0 < max_norm < norm
        self.state.window.add_norm(norm, clipped)
        self.interval.add_norm(norm, clipped)

    def batch_done(self, amount: float | None) -> None:
        """A training batch of ``amount`` work (audio seconds, tokens) was trained."""
        for window in (self.state.window, self.interval):
            window.batches += 1
            window.amount += amount or 0.0

    def interval_due(self, optimizer_step: int, stepped: bool) -> bool:
        """Whether an optimizer step just taken ends a ``log_interval_steps`` interval."""
        n = self.settings.log_interval_steps
        return stepped and n > 0 and optimizer_step % n == 0

    def log_interval(
        self, optimizer_step: int, batch: int, n_batches: int | None, epochs_left: int,
        lr: float, loss: float,
    ) -> dict[str, Any]:
        """The interval's line in ``log.txt`` (main process) and TensorBoard scalars (all
        processes call it: it gathers). Returns the fields."""
        self._stop_clock()
        peak = peak_memory_bytes(self._device)
        self._peak_bytes = max(self._peak_bytes, peak)
        fields: dict[str, Any] = {
            "step": optimizer_step,
            "epoch": self._epoch,
            "progress": f"{batch}/{n_batches}" if n_batches else str(batch),
            "lr": lr,
            "loss": loss,
            **self.interval.stats(self.unit, peak),
        }
        self._eta = self.eta_within_epoch(batch, n_batches, epochs_left)
        if self._eta is not None:
            fields["eta"] = format_eta(self._eta)
        if if_main_process():
            logger.info(", ".join(f"{k}: {_fmt(v)}" for k, v in fields.items()))
        self.write_scalars("train", fields, optimizer_step)
        self.interval = Window()
        reset_peak_memory(self._device)
        self._start_clock()
        return fields

    def end_train(self) -> dict[str, Any]:
        """Training stage end (all processes: gathers): the epoch's fields without ``eta``."""
        self._stop_clock()
        peak = max(self._peak_bytes, peak_memory_bytes(self._device))
        self.epoch_stats = self.state.window.stats(self.unit, peak)
        self._valid_start = time.perf_counter()
        return self.epoch_stats

    def end_epoch(self, epoch: int, epochs_left: int, valid_loss: float) -> dict[str, Any]:
        """Validation end, before the epoch is logged: records the epoch (its wall time from
        the training start to now, its valid loss) and adds ``eta`` to the epoch's fields."""
        now = time.perf_counter()
        window = self.state.window
        valid_seconds = now - self._valid_start if self._valid_start is not None else None
        record = EpochRecord(
            epoch=epoch,
            grad_norm_mean=window.norm_sum / window.norm_count if window.norm_count else None,
            grad_norm_max=window.norm_max if window.norm_count else None,
            valid_loss=valid_loss,
            seconds=None if self._partial else now - self._epoch_start,
            valid_seconds=valid_seconds,
        )
        self.state.history = [r for r in self.state.history if r.epoch < epoch] + [record]
        self._eta = epochs_left * (self.epoch_seconds() or 0.0)
        self.epoch_stats["eta"] = format_eta(self._eta)
        self._epoch_start = 0.0
        return self.epoch_stats

    def epoch_seconds(self) -> float | None:
        """The mean wall time of the whole epochs recorded (None: none yet)."""
        times = [r.seconds for r in self.state.history if r.seconds is not None]
        return sum(times) / len(times) if times else None

    def eta_within_epoch(self, batch: int, n_batches: int | None, epochs_left: int) -> float | None:
        """Seconds to the end of the last epoch from batch ``batch`` of the current one:
        by the time per batch and the loader's length when known, else by the previous
        epochs' times (None when neither is known)."""
        window = self.state.window
        epoch_time = self.epoch_seconds()
        valids = [r.valid_seconds for r in self.state.history if r.valid_seconds is not None]
        valid_time = sum(valids) / len(valids) if valids else 0.0
        if n_batches and window.batches:
            per_batch = window.seconds / window.batches
            this_epoch = per_batch * max(n_batches - batch, 0) + valid_time
            if epoch_time is None:
                epoch_time = per_batch * n_batches + valid_time
            return this_epoch + epochs_left * epoch_time
        if epoch_time is None:
            return None
        elapsed = time.perf_counter() - self._epoch_start
        return max(epoch_time - elapsed, 0.0) + epochs_left * epoch_time

    def write_scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """The numeric ``values`` as ``<prefix>/<name>`` at ``step`` (``eta`` as ``eta_s``,
        unrounded seconds)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if name == "eta":
                name, value = "eta_s", self._eta
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(f"{prefix}/{name.replace(' ', '_')}", value, step)

    def write_epoch(self, epoch: int, step: int, scalars: dict[str, Any]) -> None:
        """The epoch's scalars (``epoch/...``, the epoch number among them) at ``step``."""
        if self.writer is None:
            return
        self.write_scalars("epoch", {"epoch": epoch, **scalars}, step)
        self.writer.flush()

    # ------------------------------------------------------------------ divergence

    def check_divergence(self, epoch: int, find_checkpoint: Callable[[int], Any]) -> None:
        """Raises :class:`TrainingDiverged` when the valid loss recorded by :meth:`end_epoch`
        rose ``divergence_patience`` evaluations in a row. ``find_checkpoint(epoch)``: the
        newest checkpoint left of an epoch <= ``epoch`` (None: none)."""
        patience = self.settings.divergence_patience
        losses = [r.valid_loss for r in self.state.history if r.valid_loss is not None]
        rises = rising_evaluations(losses)
        if patience is None or rises < patience:
            return
        evaluated = [r for r in self.state.history if r.valid_loss is not None]
        before = evaluated[-(rises + 1)]
        rise = " -> ".join(f"{r.valid_loss:.4g}" for r in evaluated[-(rises + 1):])
        ckpt = find_checkpoint(before.epoch)
        if ckpt is None:
            where = (f"no checkpoint of epoch {before.epoch} or earlier is left: start again "
                     "with a lower learning rate")
        else:
            where = (f"last good checkpoint: {ckpt.path} (epoch {ckpt.meta.get('epoch')}); "
                     f"lower the learning rate and resume with --resume_from {ckpt.path}")
        raise TrainingDiverged(
            f"training diverged: the valid loss rose {rises} evaluations in a row "
            f"(divergence_patience: {patience}; epochs {before.epoch}-{epoch}: {rise}); "
            f"gradient norm mean/max by epoch: {self.norm_history()}; {where}"
        )

    def nonfinite_stop(self, skipped: int, limit: int, newest: Any) -> TrainingDiverged:
        """The error for ``skipped`` non-finite steps in a row (``max_consecutive_nonfinite``),
        naming the newest checkpoint ``newest`` (None: none)."""
        recent = " ".join(f"{n:.3g}" for n in self.recent_norms)
        if newest is None:
            where = "no checkpoint yet: start again with a lower learning rate"
        else:
            where = (f"last good checkpoint: {newest.path}; lower the learning rate (or raise "
                     f"n_warmup_steps, or use fp32) and resume with --resume_from {newest.path}")
        return TrainingDiverged(
            f"training diverged: {skipped} optimizer steps in a row had non-finite gradients "
            f"(max_consecutive_nonfinite: {limit}); gradient norms of the last steps: {recent}; "
            f"mean/max by epoch: {self.norm_history()}; {where}"
        )

    def norm_history(self) -> str:
        """``'e3 0.91/2.3, e4 1.2/5.1'``: the last epochs' gradient-norm mean/max, with the
        current epoch so far."""
        items = [(r.epoch, r.grad_norm_mean, r.grad_norm_max) for r in self.state.history]
        window = self.state.window
        if self._epoch and (not items or items[-1][0] != self._epoch) and window.norm_count:
            items.append((self._epoch, window.norm_sum / window.norm_count, window.norm_max))
        shown = [f"e{e} {m:.3g}/{x:.3g}" for e, m, x in items[-HISTORY_SHOWN:] if m is not None]
        return ", ".join(shown) or "none recorded"

    # ------------------------------------------------------------------ time

    def _start_clock(self) -> None:
        self._clock_start = time.perf_counter()

    def _stop_clock(self) -> None:
        """Adds the training time since :meth:`_start_clock` to the windows."""
        if self._clock_start is None:
            return
        elapsed = time.perf_counter() - self._clock_start
        self.state.window.seconds += elapsed
        self.interval.seconds += elapsed
        self._clock_start = None


def _fmt(value: Any) -> str:
    """A ``log.txt`` value as SpeechBrain's train logger writes floats."""
    if isinstance(value, float):
        return f"{value:.2f}" if 1.0 < value < 100.0 else f"{value:.2e}"
    return str(value)
