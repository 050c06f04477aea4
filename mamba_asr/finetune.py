"""Fine-tuning: start a recipe run from another model's weights (``init_from``), keep chosen
parameters at their fresh initialisation (``init_skip``), freeze parts (``freeze``,
``unfreeze_after_epochs``).

Names: a parameter (or buffer) is named ``<module>.<path>``: ``<module>`` its module's key in the
recipe's ``modules`` (``CNN``, ``Transformer``, ``ctc_lin``, ...), ``<path>`` its
``named_parameters()`` path inside it. The ``model`` ModuleList's index names (``0.``, ``1.``, as
stored in ``model.ckpt`` / ``asr.ckpt``) map to them through the identity of the modules.

Patterns (:func:`matches`): dot-separated components matched one by one against a name's first
components; a component is an ``fnmatch`` glob, or ``a-b`` (integers) for any integer in
[a, b]: ``ctc_lin``, ``Transformer.encoder.layers.0-5``, ``Transformer.*.norm``.

Sources of ``init_from`` (:func:`read_source`): an export folder (``asr.ckpt``), a ``CKPT+...``
folder (``model.ckpt``), a run or save folder (its best checkpoints averaged, as its test stage
chooses them; an upstream xi-j/Mamba-ASR save folder by its CKPT.yaml ``WER``/``ACC``), or a bare
``model.ckpt`` file (the ``model`` ModuleList's state dict).
"""

from __future__ import annotations

import filecmp
import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    DEFAULT_LOAD_HOOKS,
    METAFNAME,
    average_checkpoints,
    get_default_hook,
)

from mamba_asr.checkpoints import AtomicCheckpointer
from mamba_asr.command_line import ConfigError
from mamba_asr.model_card import CARD_FILE, CardError, verify_folder

logger = logging.getLogger(__name__)

# The YAML keys of fine-tuning (every CTC and S2S configuration has them).
# Their values when a configuration lacks them (a run trained before they existed): no
# fine-tuning.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "init_from": None, "init_skip": [], "init_normalizer": False, "freeze": [],
    "unfreeze_after_epochs": None,
}
FINETUNE_KEYS = tuple(FINETUNE_DEFAULTS)
SOURCE_KINDS = (
    "an export folder (asr.ckpt), a run or save folder (CKPT+... folders), a CKPT+... folder "
    "(model.ckpt) or a model.ckpt file"
)
EXPORT_WEIGHTS = "asr.ckpt"
EXPORT_TOKENIZER = "tokenizer.ckpt"
# The modules whose outputs are tokens: loading them for another token map is an error.
OUTPUT_LAYERS = ("ctc_lin", "seq_lin")
CKPT_WEIGHTS = "model.ckpt"
NORMALIZER_FILE = "normalizer.ckpt"
SAVE_FOLDER = "save"
# Checkpoint meta keys a save folder's best checkpoints are chosen by, and whether higher is
# better: ours (WER, or keep_best_by) and upstream's (CTC: WER, S2S: ACC).
BEST_KEYS = {"WER": False, "ACC": True, "loss": False}
_RANGE = re.compile(r"(\d+)-(\d+)")
SHOWN = 3  # names shown in a one-line error


# --------------------------------------------------------------------------- name patterns


def matches(pattern: str, name: str) -> bool:
    """Whether ``pattern``'s components match the first components of ``name`` one by one (an
    ``fnmatch`` glob each, or ``a-b`` for an integer component in [a, b])."""
    parts, components = pattern.split("."), name.split(".")
    if len(parts) > len(components):
        return False
    for part, component in zip(parts, components, strict=False):
        span = _RANGE.fullmatch(part)
        if span and component.isdigit():
            if not int(span[1]) <= int(component) <= int(span[2]):
                return False
        elif not fnmatch.fnmatchcase(component, part):
            return False
    return True


def select(patterns: Iterable[str], names: Iterable[str], key: str) -> set[str]:
    """The ``names`` some pattern of ``patterns`` matches; ConfigError naming the YAML ``key``
    and the first pattern that matches nothing (with a few existing names)."""
    names = list(names)
    chosen: set[str] = set()
    for pattern in patterns:
        hit = {n for n in names if matches(str(pattern), n)}
        if not hit:
            tops = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))[:5]
            raise ConfigError(
                f"{key}: pattern {pattern!r} matches no parameter (names look like "
                f"{', '.join(tops)}, ...)"
            )
        chosen |= hit
    return chosen


def patterns_of(value: Any, key: str) -> list[str]:
    """The YAML list ``value`` of ``key`` as strings (a single string is one pattern)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | int) for v in value):
        raise ConfigError(f"{key}: expected a list of name patterns, got {value!r}")
    return [str(v) for v in value]


def module_names(model: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """``model``'s child names (ModuleList indices) -> their key in ``modules``."""
    by_id = {id(m): name for name, m in modules.items()}
    return {child: by_id[id(m)] for child, m in model.named_children() if id(m) in by_id}


def rename(state: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """``state`` with its first name component renamed by ``names`` (others kept)."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        out[f"{names.get(head, head)}.{rest}" if rest else names.get(head, head)] = value
    return out


# --------------------------------------------------------------------------- sources


@dataclass
class InitSource:
    """Weights to start from: the ``model`` ModuleList's state dict (index names)."""

    kind: str  # "export folder", "checkpoint", "save folder", "model file"
    path: Path
    state: dict[str, torch.Tensor]
    normalizer: Path | None  # the source's normalizer.ckpt, when it has one
    detail: str = ""  # which checkpoints, for the log
    tokenizer: Path | None = None  # the source's token map, when it has one of ours


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved by torch; ConfigError when the file is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise ConfigError(f"init_from {path}: not a readable torch state dict ({exc})") from exc
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"init_from {path}: expected a state dict of tensors (a model.ckpt)")
    return dict(state)


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def read_source(
    path: str | Path, model: torch.nn.Module, best_key: tuple[str, bool], tokenizer_name: str
) -> InitSource:
    """The weights ``init_from`` names (see the module docstring). ``model`` (the recipe's
    ``model``) checks a save folder's checkpoints complete; ``best_key`` is the recipe's
    ranking, used when the run's configuration does not name one; ``tokenizer_name`` the
    file name of a run's token map in its save folder."""
    source = Path(path)
    if source.is_file():
        return InitSource("model file", source, _load_state(source),
                          _optional(source.parent / NORMALIZER_FILE))
    if not source.is_dir():
        raise ConfigError(f"init_from {source}: no such file or folder; expected {SOURCE_KINDS}")
    if (source / EXPORT_WEIGHTS).is_file():
        if (source / CARD_FILE).is_file():
            try:
                verify_folder(source)
            except CardError as exc:
                raise ConfigError(f"init_from: {exc}") from exc
        return InitSource("export folder", source, _load_state(source / EXPORT_WEIGHTS),
                          _optional(source / NORMALIZER_FILE),
                          tokenizer=_optional(source / EXPORT_TOKENIZER))
    if (source / METAFNAME).is_file():
        problem = AtomicCheckpointer(source.parent, {"model": model}).check_checkpoint_dir(source)
        if problem is not None:
            raise ConfigError(f"init_from {source}: the checkpoint is incomplete: {problem}")
        return InitSource("checkpoint", source, _load_state(source / CKPT_WEIGHTS),
                          _optional(source / NORMALIZER_FILE),
                          tokenizer=_optional(source.parent / tokenizer_name))
    folder = source
    if not any(folder.glob(f"{CKPT_PREFIX}+*")) and (folder / SAVE_FOLDER).is_dir():
        folder = folder / SAVE_FOLDER
    if not any(folder.glob(f"{CKPT_PREFIX}+*")):
        raise ConfigError(f"init_from {source}: holds no model; expected {SOURCE_KINDS}")
    found = _best_of_save_folder(source, folder, model, best_key)
    found.tokenizer = _optional(folder / tokenizer_name)
    return found


def _best_of_save_folder(
    source: Path, folder: Path, model: torch.nn.Module, best_key: tuple[str, bool]
) -> InitSource:
    """The average of a save folder's best checkpoints: ranked by the run's ``keep_best_by``
    (hyperparams.yaml beside it), else the recipe's key, else upstream's WER / ACC, whichever
    the checkpoints' metas hold; the run's ``avg_checkpoints`` of them (all of them when the
    folder has no configuration of its own: upstream's test stage averages every one kept)."""
    from mamba_asr.trained import describe_checkpoints, trained_config  # (imports the brain)

    config = trained_config(folder)
    checker = AtomicCheckpointer(folder, {"model": model})  # lists complete checkpoints only
    ckpts = checker.list_checkpoints()
    if not ckpts:
        raise ConfigError(f"init_from {source}: no complete checkpoint in {folder}")
    wanted = [config.get("keep_best_by"), best_key[0], *BEST_KEYS]
    key = next((k for k in wanted if k and any(k in c.meta for c in ckpts)), None)
    number = config.get("avg_checkpoints")
    number = number if isinstance(number, int) and number > 0 else None
    if key is None:
        chosen = [checker.find_checkpoint()]
        how = "the newest: no WER/ACC in their metas"
    else:
        higher = BEST_KEYS.get(key, best_key[1] if key == best_key[0] else False)
        chosen = checker.find_checkpoints(
            max_key=key if higher else None, min_key=None if higher else key,
            max_num_checkpoints=number,
        )
        how = f"the best by valid {key}, {'highest' if higher else 'lowest'} first"
    state = average_checkpoints(chosen, recoverable_name="model")
    normalizer = _optional(Path(chosen[0].path) / NORMALIZER_FILE)
    detail = f"{describe_checkpoints(chosen, key)} ({how})"
    kind = "run folder" if config else "save folder"
    return InitSource(kind, source, dict(state), normalizer, detail)


# --------------------------------------------------------------------------- loading


def _shape(value: torch.Tensor | None) -> str:
    return "missing" if value is None else f"({', '.join(map(str, value.shape))})"


def load_init(
    source: InitSource,
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    skip_patterns: list[str],
) -> tuple[int, list[str]]:
    """Loads ``source`` into ``model`` strictly: every tensor of the model from the source with
    the same shape and every source tensor used, except names an ``init_skip`` pattern matches
    (left as they are). ConfigError naming the first mismatches otherwise. Returns (tensors
    loaded, names skipped)."""
    names = module_names(model, modules)
    own = rename(model.state_dict(), names)
    theirs = rename(source.state, names)
    skipped = select(skip_patterns, dict.fromkeys([*own, *theirs]), "init_skip")
    problems = []
    for name, value in own.items():
        if name in skipped:
            continue
        other = theirs.get(name)
        if other is None or other.shape != value.shape:
            problems.append(f"{name}: {_shape(other)} in the source, {_shape(value)} here")
    problems += [f"{name}: not in this model" for name in theirs
                 if name not in own and name not in skipped]
    if problems:
        more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise ConfigError(
            f"init_from {source.path}: the source does not fit this model: "
            f"{'; '.join(problems[:SHOWN])}{more}; add them to init_skip to keep their fresh "
            "initialisation"
        )
    merged = {name: value if name in skipped else theirs[name] for name, value in own.items()}
    back = {v: k for k, v in names.items()}
    model.load_state_dict(rename(merged, back), strict=True)
    return len(own) - len(skipped & own.keys()), sorted(skipped)


def check_tokens(
    source: InitSource, tokenizer: Path, modules: Iterable[str], skipped: list[str]
) -> None:
    """ConfigError when the source's token map differs from this run's (``tokenizer``) while
    an output layer among ``modules`` keeps the source's weights: its outputs would mean
    other tokens."""
    if source.tokenizer is None or not tokenizer.is_file():
        return
    if filecmp.cmp(source.tokenizer, tokenizer, shallow=False):
        return
    kept = [m for m in OUTPUT_LAYERS
            if m in modules and not any(matches(m, s) for s in skipped)]
    if kept:
        raise ConfigError(
            f"init_from {source.path}: its token map {source.tokenizer} differs from this run's "
            f"{tokenizer}, but {', '.join(kept)} would keep the source's weights: add the output "
            "layers to init_skip (a new vocabulary) or give this run the source's tokenizer"
        )


def load_normalizer(source: InitSource, normalizer: torch.nn.Module) -> None:
    """The source's normaliser statistics into ``normalizer``, as SpeechBrain's checkpointer
    loads them (its default load hook)."""
    if source.normalizer is None:
        raise ConfigError(
            f"init_normalizer: True, but init_from {source.path} has no {NORMALIZER_FILE}"
        )
    get_default_hook(normalizer, DEFAULT_LOAD_HOOKS)(normalizer, source.normalizer, False)


def initialise(brain: Any) -> None:
    """Loads ``init_from`` into the brain's ``model`` (and its normaliser with
    ``init_normalizer``) and logs what it loaded. Called before the optimizer exists, on every
    process alike (each reads the same files)."""
    hparams = brain.hparams
    tokenizer = Path(hparams.tokenizer_file)
    source = read_source(hparams.init_from, hparams.model, brain.best_key(), tokenizer.name)
    skip = patterns_of(hparams.init_skip, "init_skip")
    modules = dict(brain.modules.items())
    loaded, skipped = load_init(source, hparams.model, modules, skip)
    check_tokens(source, tokenizer, modules, skipped)
    norm = "fresh"
    if hparams.init_normalizer:
        load_normalizer(source, brain.modules.normalize)
        norm = f"from {source.normalizer}"
    shown = ", ".join(skipped[:SHOWN]) + (", ..." if len(skipped) > SHOWN else "")
    logger.info(
        "init_from %s %s%s: %d tensors loaded, %d left at their fresh initialisation (init_skip"
        "%s); normaliser statistics %s; optimizer, scheduler and epoch counter fresh",
        source.kind, source.path, f": {source.detail}" if source.detail else "", loaded,
        len(skipped), f": {shown}" if skipped else " empty", norm,
    )


# --------------------------------------------------------------------------- freezing


def frozen_parameters(
    modules: torch.nn.Module, patterns: list[str]
) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``modules`` (a ModuleDict: names ``<module>.<path>``) the ``freeze``
    patterns match."""
    params = dict(modules.named_parameters())
    return {name: params[name] for name in sorted(select(patterns, params, "freeze"))}


def set_trainable(params: Iterable[torch.nn.Parameter], trainable: bool) -> None:
    """``requires_grad`` of ``params``: frozen ones get no gradient, so no optimizer state."""
    for param in params:
        param.requires_grad_(trainable)


def describe_frozen(modules: torch.nn.Module, frozen: Mapping[str, torch.nn.Parameter],
                    patterns: list[str]) -> str:
    """``frozen: N parameters (M tensors) in <patterns>; trainable: K``."""
    n_frozen = sum(p.numel() for p in frozen.values())
    trainable = sum(p.numel() for p in modules.parameters() if p.requires_grad)
    return (f"frozen: {n_frozen} parameters ({len(frozen)} tensors) in {', '.join(patterns)}; "
            f"trainable: {trainable}")
