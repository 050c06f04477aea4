"""Checks the recipe tests run on a family of configurations (``hparams/<family>/*.yaml``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path

from speechbrain.utils.run_opts import RunOptions


def top_keys(path: Path) -> list[str]:
    """The top-level keys of a YAML file, in order."""
    return re.findall(r"^([A-Za-z_][\w]*):", path.read_text(encoding="utf-8"), flags=re.M)


def is_conmamba(path: Path) -> bool:
    """Whether the configuration builds a ConMamba encoder."""
    return "encoder_module: conmamba" in path.read_text(encoding="utf-8")


def _code(scripts: Iterable[Path]) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in scripts)


def assert_family_shares_keys(folder: Path, names: list[str], model_keys: list[str]) -> None:
    """Every configuration has conformer_large's keys in its order, plus ``model_keys``
    exactly when it builds a ConMamba encoder."""
    reference = top_keys(folder / "conformer_large.yaml")
    for name in names:
        keys = top_keys(folder / f"{name}.yaml")
        assert [k for k in keys if k not in model_keys] == reference, name
        assert is_conmamba(folder / f"{name}.yaml") == all(k in keys for k in model_keys), name


def assert_every_key_used(folder: Path, names: list[str], scripts: Iterable[Path]) -> None:
    """Each top-level key is read by the scripts, referenced in its YAML or a run option."""
    code = _code(scripts)
    run_options = {f.name for f in dataclasses.fields(RunOptions)}
    for name in names:
        text = (folder / f"{name}.yaml").read_text(encoding="utf-8")
        for key in top_keys(folder / f"{name}.yaml"):
            used = (
                key.startswith("__")
                or key in run_options
                or f"<{key}>" in text
                or re.search(rf"[\"'.]{key}\b", code)
            )
            assert used, f"{name}.yaml: {key} is used neither by the recipe nor by the YAML"


def keys_read(scripts: Iterable[Path]) -> set[str]:
    """Keys the scripts read as ``hparams["key"]``, ``hparams['key']`` or ``hparams.key``."""
    code = _code(scripts)
    read = set(re.findall(r"hparams\[[\"'](\w+)[\"']\]", code))
    return read | set(re.findall(r"hparams\.(\w+)", code)) - {"get"}


def assert_declared_keys_present(declared: set[str], folder: Path, names: list[str]) -> None:
    """Every configuration defines the keys the recipe declares."""
    for name in names:
        keys = set(top_keys(folder / f"{name}.yaml"))
        assert declared <= keys, (name, sorted(declared - keys))
