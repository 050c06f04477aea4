"""The ``Brain`` classes the recipes build on.

* :class:`TrainingBrain`: a SpeechBrain ``Brain`` with the training behaviour of every recipe
  (the LM's included); it

  - steps the Noam scheduler (``noam_annealing``) once per optimizer step actually taken;
  - skips optimizer steps whose gradients are not finite (non-finite loss included), counts
    them (``skipped_steps`` per epoch) and goes on; ``max_consecutive_nonfinite`` skipped
    steps in a row raise (the model has diverged);
  - re-shuffles its train batch sampler (one with ``set_epoch``: SpeechBrain's
    ``DynamicBatchSampler``, the LM's bucketing sampler) every epoch in a single process
    (SpeechBrain calls ``set_epoch`` only under DDP);
  - resumes from the latest checkpoint, or from ``resume_from`` (a ``CKPT+...`` folder) once;
  - logs each epoch (:meth:`~TrainingBrain.log_epoch`): lr, optimizer steps, skipped steps
    and, under DDP, the number of batches every process trained (``process_batches``), then
    the statistics of :mod:`mamba_asr.training_monitor` (gradient norm, clipped steps,
    throughput, peak memory, ETA; every ``log_interval_steps`` steps in ``log.txt`` too;
    TensorBoard with ``tensorboard: True``), and each test (:meth:`~TrainingBrain.log_test`);
  - stops a diverging run (``divergence_patience`` rising valid losses, or the non-finite
    limit) with :class:`~mamba_asr.training_monitor.TrainingDiverged`, naming the checkpoint
    to resume from;
  - keeps the best checkpoints by :meth:`~TrainingBrain.best_key` (valid loss unless a
    recipe says otherwise).
* :class:`RecipeBrain`: the ``TrainingBrain`` of the ASR recipes, which adds WER/CER: it
  keeps the best ``avg_checkpoints`` by valid WER (the S2S recipe: ``keep_best_by``),
  evaluates their average (or that of ``eval_checkpoints``, set by ``evaluate.py``) and
  writes ``wer_<test-set>.txt`` / ``.json`` plus a one-line summary in the train log. Its
  loaders drop utterances whose audio cannot be decoded (:mod:`mamba_asr.unreadable_audio`):
  counted as ``skipped_utterances`` per stage, more than ``max_skipped_fraction`` of a
  stage's utterances stop the run. It trains from shards (``train_shards``) through
  :class:`~mamba_asr.shards.training.ShardTraining`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import Checkpoint, average_checkpoints
from speechbrain.utils.distributed import (
    ddp_barrier,
    if_main_process,
    is_distributed_initialized,
)
from speechbrain.utils.metric_stats import ErrorRateStats

from mamba_asr import finetune
from mamba_asr.atomic import atomic_open
from mamba_asr.collectives import gather
from mamba_asr.command_line import ConfigError, raise_if_interrupted
from mamba_asr.reports.scores import scores_path, write_scores
from mamba_asr.resume import checkpoint_from_dir, pending_resume, resume_marker
from mamba_asr.shards.training import ShardTraining
from mamba_asr.training_monitor import MonitorSettings, TrainingMonitor
from mamba_asr.unreadable_audio import (
    SkippedUtterances,
    UnreadableBatch,
    collate_readable,
    unreadable_batch_error,
)
from modules.activation_checkpointing import enable_activation_checkpointing

logger = logging.getLogger(__name__)

# Keys TrainingBrain and config.start_run read (a recipe's KEYS add its own).
TRAINING_KEYS = (
    "output_folder", "resume_from", "max_consecutive_nonfinite", "epoch_counter",
    "train_logger", "checkpointer", "cpu_threads", "log_interval_steps", "tensorboard",
    "divergence_patience",
)
# Keys RecipeBrain reads (an ASR recipe's KEYS add data.DATA_KEYS and its own).
RECIPE_KEYS = (
    *TRAINING_KEYS, "avg_checkpoints", "model", "max_skipped_fraction", "activation_checkpointing",
    *finetune.FINETUNE_KEYS,
)


class TrainingBrain(sb.Brain):
    """``sb.Brain`` with the training behaviour every recipe shares (see the module docstring).

    Subclasses give their validation/test stats by overriding :meth:`eval_stats` (default: the
    loss), the checkpoint ranking by :meth:`best_key` and how many to keep by
    :meth:`checkpoints_to_keep`; overriding ``on_stage_start``/``on_stage_end`` they call
    ``super()``. Throughput counts :meth:`trained_amount` of every batch, in
    ``throughput_unit`` (None: no throughput).
    """

    throughput_unit: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hparams
        output = getattr(hp, "output_folder", None)
        self.monitor = TrainingMonitor(
            MonitorSettings(
                log_interval_steps=getattr(hp, "log_interval_steps", 0),
                tensorboard=getattr(hp, "tensorboard", False),
                divergence_patience=getattr(hp, "divergence_patience", None),
            ),
            self.throughput_unit,
            Path(output) / "tensorboard" if output is not None else None,
        )
        if self.checkpointer is not None:  # older checkpoints lack it: optional
            self.checkpointer.add_recoverable("training_monitor", self.monitor, optional_load=True)
        self._train_loader: Any = None
        self._nonfinite_valid = 0  # validation batches with a non-finite loss
        self.optimizer_stepped = False
        self.skipped_steps = 0
        self.nonfinite_losses = 0
        self.test_set_name = "test"
        self.test_stats: dict[str, float] = {}
        self.train_stats: dict[str, float] = {}
        self.process_batches: list[int] = []
        self._consecutive_skips = 0
        self._epoch_sampler: torch.utils.data.Sampler | None = None

    # ------------------------------------------------------------------ data

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's, remembering a train batch sampler that has ``set_epoch`` (e.g. a
        ``DynamicBatchSampler``) to re-shuffle it every epoch."""
        sampler = loader_kwargs.get("batch_sampler")
        if stage == sb.Stage.TRAIN and callable(getattr(sampler, "set_epoch", None)):
            self._epoch_sampler = sampler
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if stage == sb.Stage.TRAIN:
            self._train_loader = loader  # its length: the interval lines' progress and ETA
        return loader

    def trained_amount(self, batch: Any) -> float | None:
        """The work in a training batch, in ``throughput_unit`` (None: not measured)."""
        return None

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        """Training: re-shuffles the batch sampler for ``epoch`` (deterministic from seed +
        epoch, so an intra-epoch resume sees the same batches) and resets the per-epoch
        counters. Every stage: raises a Ctrl-C that a finaliser swallowed (the previous
        stage's loader iterator shuts its workers down in ``__del__``)."""
        raise_if_interrupted()
        if stage != sb.Stage.TRAIN:
            return
        self.skipped_steps = 0
        self.nonfinite_losses = 0
        self.monitor.start_epoch(epoch, self.device, resumed_mid_epoch=self.step > 0)
        # Under DDP SpeechBrain wraps the sampler and calls set_epoch itself.
        if self._epoch_sampler is not None and self.train_sampler is None:
            self._epoch_sampler.set_epoch(epoch)

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        """After training (on every process): keeps the train loss for :meth:`log_epoch` and
        gathers how many batches each process trained this epoch and the monitor's statistics.
        After validation: logs the epoch, saves its checkpoint, then stops a diverging run
        (:class:`~mamba_asr.training_monitor.TrainingDiverged`); after a test: logs the
        results (:meth:`log_test`), both with the stats of :meth:`eval_stats`."""
        if stage != sb.Stage.TRAIN:
            stats = self.eval_stats(stage_loss)
            if stage == sb.Stage.VALID:
                # A NaN batch loss is left out of SpeechBrain's mean: it makes the loss NaN here.
                loss = math.nan if self._nonfinite_valid else float(stats["loss"])
                self._nonfinite_valid = 0  # counted afresh by the next validation
                loss = gather(loss)[0]  # every process decides as the first
                self.monitor.end_epoch(epoch, self.hparams.epoch_counter.limit - epoch, loss)
                self.log_epoch(epoch, stats)
                self.save_epoch_checkpoint(epoch, stats)
                self.monitor.check_divergence(epoch, self.checkpoint_of_epoch)
            else:
                self.log_test(stats)
            return
        self.train_stats = {"loss": stage_loss}
        self.process_batches = gather(self.step)
        self.monitor.end_train()

    def evaluate_batch(self, batch, stage):
        """SpeechBrain's; counts the validation batches whose loss is not finite."""
        loss = super().evaluate_batch(batch, stage)
        if stage == sb.Stage.VALID and not torch.isfinite(loss):
            self._nonfinite_valid += 1
        return loss

    def eval_stats(self, stage_loss: float) -> dict[str, float]:
        """Validation/test stats, in train-log order (kept in the checkpoint's meta after
        validation): the loss; recipes that measure more override this."""
        return {"loss": stage_loss}

    def on_fit_batch_end(self, batch: Any, outputs: Any, loss: Any, should_step: bool) -> None:
        """Steps ``noam_annealing`` (when the config has one) once per optimizer step taken;
        raises a Ctrl-C that a finaliser swallowed (:func:`raise_if_interrupted`)."""
        raise_if_interrupted()
        scheduler = getattr(self.hparams, "noam_annealing", None)
        if scheduler is not None and should_step and self.optimizer_stepped:
            scheduler(self.optimizer)
        self.monitor.batch_done(self.trained_amount(batch))
        if self.monitor.interval_due(self.optimizer_step, should_step and self.optimizer_stepped):
            loader = self._train_loader
            counter = self.hparams.epoch_counter
            self.monitor.log_interval(
                self.optimizer_step, self.step,
                len(loader) if hasattr(loader, "__len__") else None,
                counter.limit - counter.current, self.optimizer.param_groups[0]["lr"],
                self.update_average(loss.detach().cpu(), self.avg_train_loss),
            )

    def best_key(self) -> tuple[str, bool]:
        """(checkpoint meta key, whether higher is better) by which checkpoints are kept and
        ranked: the valid loss, lower is better; recipes may override."""
        return "loss", False

    def checkpoints_to_keep(self) -> int:
        """How many of the best checkpoints by :meth:`best_key` are kept (besides the
        latest); each recipe names its YAML key."""
        raise NotImplementedError(f"{type(self).__name__} must define checkpoints_to_keep")

    def save_epoch_checkpoint(self, epoch: int, valid_stats: dict[str, float]) -> None:
        """Saves the end-of-epoch checkpoint (meta: ``epoch`` and ``valid_stats``) and keeps
        the :meth:`checkpoints_to_keep` best by :meth:`best_key`."""
        key, higher = self.best_key()
        self.checkpointer.save_and_keep_only(
            meta={**valid_stats, "epoch": epoch},
            max_keys=[key] if higher else None,
            min_keys=None if higher else [key],
            num_to_keep=self.checkpoints_to_keep(),
        )

    def log_epoch(self, epoch: int, valid_stats: dict[str, float]) -> None:
        """One train-log line: ``epoch: N, lr: ..., steps: ..., skipped_steps: ...[,
        process_batches: B0 B1 ...], grad_norm_mean: ..., ..., eta: H:MM:SS - train loss: ...
        - valid loss: ..., valid ...``; the same numbers to TensorBoard (``epoch/...`` at the
        optimizer step)."""
        meta = self.epoch_meta()
        self.hparams.train_logger.log_stats(
            stats_meta={"epoch": epoch, **meta}, train_stats=self.train_stats,
            valid_stats=valid_stats,
        )
        self.monitor.write_epoch(epoch, self.optimizer_step, {
            **meta,
            **{f"train_{k}": v for k, v in self.train_stats.items()},
            **{f"valid_{k}": v for k, v in valid_stats.items()},
        })

    def epoch_meta(self) -> dict[str, Any]:
        """The ``name: value`` fields of the epoch's train-log line after ``epoch``; subclasses
        extend it (``super().epoch_meta()`` first)."""
        meta: dict[str, Any] = {
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": self.optimizer_step,
            "skipped_steps": self.skipped_steps,
        }
        if len(self.process_batches) > 1:
            meta["process_batches"] = " ".join(map(str, self.process_batches))
        return {**meta, **self.monitor.epoch_stats}

    def checkpoint_of_epoch(self, epoch: int) -> Checkpoint | None:
        """The newest end-of-epoch checkpoint left of epoch ``epoch`` or earlier."""
        if self.checkpointer is None:
            return None
        return self.checkpointer.find_checkpoint(
            ckpt_predicate=lambda c: bool(c.meta.get("end-of-epoch"))
            and c.meta.get("epoch", math.inf) <= epoch
        )

    def log_test(self, stats: dict[str, float]) -> None:
        """Keeps ``stats`` as ``test_stats`` and logs ``Epoch loaded: N, test set: <name> -
        test ...`` to the train log."""
        self.test_stats = stats
        self.hparams.train_logger.log_stats(
            stats_meta={
                "Epoch loaded": self.hparams.epoch_counter.current,
                "test set": self.test_set_name,
            },
            test_stats=stats,
        )

    # ------------------------------------------------------------------ resuming

    def fit(self, epoch_counter, train_set, valid_set=None, progressbar=None,
            train_loader_kwargs=None, valid_loader_kwargs=None):
        """SpeechBrain's; the TensorBoard writer is closed at its end, however it ends."""
        try:
            super().fit(epoch_counter, train_set, valid_set, progressbar,
                        train_loader_kwargs or {}, valid_loader_kwargs or {})
        finally:
            self.monitor.close()

    def on_fit_start(self) -> None:
        """Resumes from ``resume_from`` the first time it is given, else from the latest
        checkpoint of this run (a rerun of the same command continues where it stopped);
        then opens TensorBoard from the optimizer step resumed."""
        ckpt = self._explicit_resume()
        if ckpt is None:
            super().on_fit_start()
        else:
            self._compile()
            self._wrap_distributed()
            self.init_optimizers()
            logger.info("resuming from %s (resume_from)", ckpt.path)
            self.checkpointer.load_checkpoint(ckpt)
        self.monitor.open_tensorboard(self.optimizer_step)

    def _explicit_resume(self) -> Checkpoint | None:
        """The ``resume_from`` checkpoint unless this run already started from it and saved
        a checkpoint since (:func:`pending_resume`)."""
        path = self.hparams.resume_from
        if not path or self.checkpointer is None:
            return None
        pending = pending_resume(path, self.checkpointer)
        ddp_barrier()  # every process has decided before the marker changes
        if pending is None:  # (the named checkpoint may since have been deleted as not the best)
            logger.info("this run already started from %s: resuming from its latest", path)
            return None
        ckpt = checkpoint_from_dir(pending, self.checkpointer)
        if if_main_process():
            with atomic_open(resume_marker(self.checkpointer), "w", encoding="utf-8") as f:
                f.write(f"{pending.resolve()}\n")
        return ckpt

    # ------------------------------------------------------------------ non-finite steps

    def check_loss_isfinite(self, loss: torch.Tensor) -> None:
        """Counts a non-finite loss; its step is skipped in :meth:`optimizers_step`."""
        if not torch.isfinite(loss):
            self.nonfinite_losses += 1
            logger.warning("non-finite loss (%s): this step will be skipped", loss.item())

    def optimizers_step(self) -> None:
        """Unscale, clip to ``max_grad_norm`` and step, unless the gradient norm is not finite.

        Under DDP the gradients are already reduced, so every process skips the same steps.
        """
        if self.opt_class is None:
            return
        opts = list(self.freeze_optimizers(self.optimizers_dict).values())
        for opt in opts:
            self.scaler.unscale_(opt)
        params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = bool(torch.isfinite(norm))
        self.monitor.record_norm(float(norm), self.max_grad_norm)
        if finite or self.scaler.is_enabled():  # GradScaler skips non-finite steps itself
            for opt in opts:
                self.scaler.step(opt)
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.optimizer_stepped = finite
        if finite:
            self.optimizer_step += 1
            self._consecutive_skips = 0
            return
        self.skipped_steps += 1
        self._consecutive_skips += 1
        logger.warning(
            "gradient norm %s is not finite: step skipped (%d this epoch)",
            norm.item(), self.skipped_steps,
        )
        limit = self.hparams.max_consecutive_nonfinite
        if self._consecutive_skips >= limit:
            newest = self.checkpointer.find_checkpoint() if self.checkpointer is not None else None
            raise self.monitor.nonfinite_stop(self._consecutive_skips, limit, newest)


class RecipeBrain(ShardTraining, TrainingBrain):
    """The ``TrainingBrain`` of the ASR recipes: WER/CER (see the module docstring).

    Subclasses fill ``wer_metric``/``cer_metric`` in ``compute_objectives`` outside training;
    other validation/test stats come from overriding :meth:`eval_stats`.
    """

    throughput_unit = "audio_s"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_checkpoints: list[Checkpoint] | None = None
        self.wer_file: Path | None = None
        self._loaded_for_eval: tuple[Path, ...] | None = None
        self.unreadable = SkippedUtterances()
        self.frozen: dict[str, torch.nn.Parameter] = {}  # by name, while frozen

    @classmethod
    def from_hparams(
        cls, hparams: dict[str, Any], run_opts: Any, checkpointer: Any
    ) -> RecipeBrain:
        """The brain of an ASR configuration: its ``modules``, optimised by ``model_opt_class``."""
        return cls(
            modules=hparams["modules"],
            opt_class=hparams["model_opt_class"],
            hparams=hparams,
            run_opts=run_opts,
            checkpointer=checkpointer,
        )

    # ------------------------------------------------------------------ unreadable audio

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """The loader of every stage drops the utterances whose audio cannot be decoded
        (``collate_fn``: ``collate_readable``, unless given); the stage's data-set size is
        what ``max_skipped_fraction`` counts against."""
        loader_kwargs.setdefault("collate_fn", collate_readable)
        if hasattr(dataset, "__len__"):
            self.unreadable.sizes[stage] = len(dataset)
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def trained_amount(self, batch: Any) -> float | None:
        """Seconds of audio in the batch: ``sig``'s relative lengths x padded samples /
        ``sample_rate`` (None: a batch without ``sig``)."""
        sig = getattr(batch, "sig", None)
        if sig is None:
            return None
        wavs, lens = sig  # (B, T), (B,)
        return float(lens.sum()) * wavs.shape[1] / self.hparams.sample_rate

    def fit_batch(self, batch):
        """SpeechBrain's training step on the batch's readable utterances; a batch with none
        is skipped (NaN loss, left out of the epoch's mean)."""
        if self._readable(batch, sb.Stage.TRAIN):
            return super().fit_batch(batch)
        return torch.tensor(float("nan"))

    def evaluate_batch(self, batch, stage):
        """SpeechBrain's evaluation of the batch's readable utterances; a batch with none is
        skipped (NaN loss, left out of the mean)."""
        if self._readable(batch, stage):
            return super().evaluate_batch(batch, stage)
        return torch.tensor(float("nan"))

    def _readable(self, batch: Any, stage: sb.Stage) -> bool:
        """Counts and warns about the utterances ``batch`` dropped (raising beyond
        ``max_skipped_fraction``); whether any is left. Under DDP a training batch with none
        is an error: the other processes would take an optimizer step this one cannot."""
        skipped = getattr(batch, "skipped", ())
        if skipped:
            self.unreadable.add(stage, skipped, self.hparams.max_skipped_fraction)
        if not isinstance(batch, UnreadableBatch):
            return True
        if stage == sb.Stage.TRAIN and is_distributed_initialized():
            raise unreadable_batch_error(batch)
        return False

    def _skipped_in_training(self) -> int:
        """The training utterances every process skipped this epoch, together."""
        return sum(gather(self.unreadable.count(sb.Stage.TRAIN)))

    # ------------------------------------------------------------------ stages

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        """Training past ``unfreeze_after_epochs``: the frozen parameters train again.
        Validation and test: fresh ``wer_metric``/``cer_metric``; every stage: a fresh count
        of skipped utterances."""
        super().on_stage_start(stage, epoch)
        self.unreadable.start(stage)
        after = self.hparams.unfreeze_after_epochs if self.frozen else None
        if stage == sb.Stage.TRAIN and after is not None and epoch > after:
            finetune.set_trainable(self.frozen.values(), True)
            logger.info("epoch %d: %d frozen tensors train from now on (unfreeze_after_epochs: "
                        "%d)", epoch, len(self.frozen), after)
            self.frozen = {}
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.wer_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        """After training: the epoch's ``skipped_utterances`` (all processes) join the train
        stats; after a test: writes the results (:meth:`report_test`)."""
        if stage == sb.Stage.TEST:
            self.report_test(self.eval_stats(stage_loss), self.wer_metric)
            return
        super().on_stage_end(stage, stage_loss, epoch)
        if stage == sb.Stage.TRAIN:
            self.train_stats["skipped_utterances"] = self._skipped_in_training()

    def log_epoch(self, epoch: int, valid_stats: dict[str, float]) -> None:
        """The epoch line, with ``valid skipped_utterances`` when validation skipped some."""
        skipped = self.unreadable.count(sb.Stage.VALID)
        if skipped:
            valid_stats = {**valid_stats, "skipped_utterances": skipped}
        super().log_epoch(epoch, valid_stats)

    def eval_stats(self, stage_loss: float) -> dict[str, float]:
        """Validation/test stats, in train-log order: loss, CER and WER (%); recipes that
        measure more override this."""
        return {
            "loss": stage_loss,
            "CER": self.cer_metric.summarize("error_rate"),
            "WER": self.wer_metric.summarize("error_rate"),
        }

    def best_key(self) -> tuple[str, bool]:
        """Checkpoints are kept, ranked and averaged by valid WER, lower is better; recipes
        may override."""
        return "WER", False

    def checkpoints_to_keep(self) -> int:
        """``avg_checkpoints``: the best checkpoints are the ones averaged for testing."""
        return self.hparams.avg_checkpoints

    # ------------------------------------------------------------------ fine-tuning

    def on_fit_start(self) -> None:
        """Before the optimizer and DDP wrappers exist: the ``init_from`` weights unless the
        run resumes (:meth:`init_from_source`), then ``freeze`` (:meth:`freeze_parameters`),
        then ``activation_checkpointing`` (:meth:`checkpoint_activations`)."""
        self.init_from_source()
        self.freeze_parameters()
        self.checkpoint_activations()
        super().on_fit_start()

    def checkpoint_activations(self) -> None:
        """``activation_checkpointing``: True, the model's encoder and decoder layers
        recompute their activations in the backward pass; a number N, the first N layers of
        each encoder/decoder stack do (:mod:`modules.activation_checkpointing`)."""
        setting = self.hparams.activation_checkpointing
        if setting is False or setting == 0:
            return
        if not isinstance(setting, int) or setting < 0:  # (True is an int: all layers)
            raise ConfigError(f"activation_checkpointing: expected True, False or a number of "
                              f"layers per encoder/decoder stack, got {setting!r}")
        layers = enable_activation_checkpointing(
            self.hparams.model, None if setting is True else setting
        )
        if layers == 0:
            raise ConfigError("activation_checkpointing: True, but the model has no encoder or "
                              "decoder layer to recompute")
        logger.info("activation_checkpointing: %d encoder/decoder layers recompute their "
                    "activations in the backward pass", layers)

    def init_from_source(self) -> None:
        """Loads ``init_from`` (:func:`finetune.initialise`) when this run has no checkpoint
        of its own and no ``resume_from``: a rerun continues from its own checkpoints."""
        if not self.hparams.init_from:
            return
        own = self.checkpointer.find_checkpoint() if self.checkpointer is not None else None
        if self.hparams.resume_from or own is not None:
            logger.info("init_from %s ignored: this run resumes from %s", self.hparams.init_from,
                        self.hparams.resume_from or own.path)
            return
        finetune.initialise(self)

    def freeze_parameters(self) -> None:
        """``freeze``: the matched parameters get no gradient (so no optimizer state) until
        epoch ``unfreeze_after_epochs`` + 1 (:meth:`on_stage_start`). Under DDP a module
        wrapped without trainable parameters cannot start training later: unfreezing is a
        ConfigError there."""
        patterns = finetune.patterns_of(self.hparams.freeze, "freeze")
        if not patterns:
            return
        after = self.hparams.unfreeze_after_epochs
        if after is not None and (not isinstance(after, int) or after < 0):
            raise ConfigError(f"unfreeze_after_epochs: expected null or an epoch count >= 0, "
                              f"got {after!r}")
        if after is not None and is_distributed_initialized():
            raise ConfigError("unfreeze_after_epochs is not supported under DDP (the frozen "
                              "modules are not wrapped for training): run two fine-tunings, "
                              "the second from the first with a shorter freeze")
        self.frozen = finetune.frozen_parameters(self.modules, patterns)
        finetune.set_trainable(self.frozen.values(), False)
        logger.info(finetune.describe_frozen(self.modules, self.frozen, patterns))

    # ------------------------------------------------------------------ evaluation

    def best_checkpoints(
        self, max_key: str | None = None, min_key: str | None = None
    ) -> list[Checkpoint]:
        """The best ``avg_checkpoints`` checkpoints, best first, by the key given, else by
        :meth:`best_key`: the ones the test stage averages."""
        if max_key is None and min_key is None:
            key, higher = self.best_key()
            max_key, min_key = (key, None) if higher else (None, key)
        return self.checkpointer.find_checkpoints(
            max_key=max_key, min_key=min_key, max_num_checkpoints=self.hparams.avg_checkpoints
        )

    def on_evaluate_start(self, max_key: str | None = None, min_key: str | None = None) -> None:
        """Loads the best checkpoint (``eval_checkpoints[0]`` when set) and the average of the
        ``model`` recoverable over the best ``avg_checkpoints`` (or all ``eval_checkpoints``),
        ranked by the key given, else by :meth:`best_key`."""
        if self.eval_checkpoints is not None:
            ckpts = self.eval_checkpoints
        elif self.checkpointer is not None:
            ckpts = self.best_checkpoints(max_key, min_key)
        else:
            ckpts = []
        if not ckpts:
            logger.warning("no checkpoint to evaluate: using the current weights")
            return
        key = tuple(Path(c.path) for c in ckpts)
        if key == self._loaded_for_eval:
            return
        self.checkpointer.load_checkpoint(ckpts[0])
        self.step = 0  # an intra-epoch checkpoint restores a mid-epoch step count
        if len(ckpts) > 1:
            state = average_checkpoints(ckpts, recoverable_name="model")
            self.hparams.model.load_state_dict(state, strict=True)
        logger.info("evaluating the average of %d checkpoint(s): %s", len(ckpts), ", ".join(
            Path(c.path).name for c in ckpts))
        self._loaded_for_eval = key

    def evaluate_test_sets(
        self,
        datasets: dict[str, Any],
        loader_kwargs: dict[str, Any],
        out_dir: str | os.PathLike,
    ) -> dict[str, dict[str, float]]:
        """``evaluate`` every test set (the best checkpoints by :meth:`best_key`, averaged);
        writes ``<out_dir>/wer_<name>.txt`` and ``.json``; returns the stats by set name."""
        results = {}
        for name, data in datasets.items():
            self.test_set_name = name
            self.wer_file = Path(out_dir) / f"wer_{name}.txt"
            self.evaluate(data, test_loader_kwargs=dict(loader_kwargs))
            results[name] = dict(self.test_stats)
        return results

    def report_test(self, stats: dict[str, float], wer_metric: ErrorRateStats) -> None:
        """Writes ``self.wer_file`` (SpeechBrain's alignments, for reading), the per-utterance
        WER and CER scores as JSON beside it (``wer_<name>.json``, what the report tools read)
        and logs ``Epoch loaded: N, test set: <name> - test loss: ..., test CER: ..., test
        WER: ..., test utterances: N, test skipped_utterances: M`` to the train log."""
        skipped = self.unreadable.count(sb.Stage.TEST)
        self.log_test({**stats, "utterances": len(wer_metric.scores),
                       "skipped_utterances": skipped})
        logger.info(
            "%s: WER %.2f %%, CER %.2f %% (%d utterances)",
            self.test_set_name, stats["WER"], stats["CER"], len(wer_metric.scores),
        )
        if self.wer_file is not None and if_main_process():
            with atomic_open(self.wer_file, "w", encoding="utf-8") as f:
                wer_metric.write_stats(f)
            metrics = {"WER": wer_metric, "CER": self.cer_metric}
            write_scores(scores_path(self.wer_file), self.test_set_name, metrics)
