"""A folder of exported models kept as immutable, content-addressed versions with aliases.

A version is an export folder (``export.py``: ``model_card.json`` and the files it lists)
copied in read-only under its id, the first 12 hex digits of the sha256 of its model card
(which holds the sha256 of every other file, checked before the copy). Aliases
(``production``, ``staging``, ...) point at one version of a model each and keep their
history, so a move can be rolled back. The service serves ``name@alias`` and follows the
alias when it moves.

Layout of the registry folder (``--models DIR``, else ``$MAMBA_ASR_MODELS``, else
``models/registry``)::

    index.json                 the one index: {"format", "models": {name: {versions, aliases}}}
    .lock                      held (filelock) by every read-modify-write of the index
    <name>/<version>/          the copied export folder, files read-only

The index is replaced atomically (:mod:`mamba_asr.atomic`), so readers (:meth:`Registry.resolve`)
take no lock and never see half an index; writers serialise on the lock, so concurrent ``add``
commands lose no entry.

Usage:
    python -m mamba_asr.registry add models/demo-ctc --name demo-ctc [--alias staging]
    python -m mamba_asr.registry list [NAME]
    python -m mamba_asr.registry show demo-ctc@production       # JSON: path, card, aliases
    python -m mamba_asr.registry promote demo-ctc@1a2b3c4d5e6f --to production
    python -m mamba_asr.registry rollback demo-ctc --alias production
    python -m mamba_asr.registry remove demo-ctc@1a2b3c4d5e6f
    python -m mamba_asr.registry --models DIR ...               # also after the command

``add`` prints the version id as its last line (``VERSION=$(python -m mamba_asr.registry add
... | tail -1)``). A reference is ``name@alias``, ``name@version`` (or a unique prefix of at
least 6 hex digits) or ``name`` (its ``production`` alias, else its newest version). An
error is one ``error: ...`` line on stderr and exit status 1.

    from mamba_asr.registry import Registry
    version = Registry("models/registry").resolve("demo-ctc@production")
    Transcriber.from_folder(version.path)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from mamba_asr.atomic import atomic_open
from mamba_asr.model_card import CARD_FILE, CardError, read_card, verify_folder

DEFAULT_ROOT = "models/registry"
ENV_VAR = "MAMBA_ASR_MODELS"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
INDEX_FORMAT = 1
DEFAULT_ALIAS = "production"
ID_LENGTH = 12
MIN_PREFIX = 6
LOCK_TIMEOUT = 60.0
_STAGING = ".staging-"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
_HEX = re.compile(r"[0-9a-f]+")


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message names the model, ref or folder."""


def default_root() -> Path:
    """The registry folder: ``$MAMBA_ASR_MODELS``, else ``models/registry``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model: its immutable export folder ``path`` and its card."""

    name: str
    version: str
    path: Path
    aliases: tuple[str, ...]
    added: str  # ISO 8601, UTC
    card: dict[str, Any] = field(compare=False, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    """``name`` if it is a model name (``[a-z0-9][a-z0-9._-]*``), else RegistryError."""
    if not NAME_PATTERN.fullmatch(name):
        raise RegistryError(
            f"model name {name!r}: expected lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. demo-ctc)"
        )
    return name


def check_alias(alias: str) -> str:
    """``alias`` if it is an alias (``[a-z][a-z0-9_-]*``, not 6+ hex digits a version id could
    start with), else RegistryError."""
    if not ALIAS_PATTERN.fullmatch(alias):
        raise RegistryError(
            f"alias {alias!r}: expected lowercase letters, digits, '_' or '-', starting with a "
            "letter (e.g. production, staging)"
        )
    if len(alias) >= MIN_PREFIX and _HEX.fullmatch(alias):
        raise RegistryError(
            f"alias {alias!r}: reads as a version id (only hex digits); choose another name"
        )
    return alias


def split_ref(ref: str) -> tuple[str, str | None]:
    """``(name, alias or version or None)`` of ``name[@alias|@version]``; names checked."""
    name, at, target = ref.partition("@")
    if at and not target:
        raise RegistryError(f"{ref!r}: expected name@alias or name@version after the '@'")
    return check_name(name), target if at else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _delete_tree(folder: Path) -> None:
    """Deletes a version copy (or staging folder), made writable first."""
    folder.chmod(0o755)
    shutil.rmtree(folder)


def card_digest(card_bytes: bytes) -> tuple[str, str]:
    """``(sha256, version id)`` of an export from its model card's bytes (the card holds the
    sha256 of every other file, so it names the whole content)."""
    digest = hashlib.sha256(card_bytes).hexdigest()
    return digest, digest[:ID_LENGTH]


class Registry:
    """The registry folder ``root`` (created by the first :meth:`add`)."""

    def __init__(self, root: str | os.PathLike, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.root = Path(root)
        self.index_path = self.root / INDEX_FILE
        self.lock_timeout = lock_timeout

    # -- the index -----------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        """The index; an empty one when the registry has none yet; RegistryError naming the
        file when it is not an index this code reads."""
        try:
            text = self.index_path.read_bytes()
        except FileNotFoundError:
            return {"format": INDEX_FORMAT, "models": {}}
        except OSError as exc:
            raise RegistryError(f"{self.index_path}: cannot be read ({exc.strerror})") from exc
        try:
            index = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.index_path}: not a valid registry index ({exc})") from exc
        self._check_index(index)
        return index

    def _check_index(self, index: Any) -> None:
        def bad(what: str) -> RegistryError:
            return RegistryError(f"{self.index_path}: not a valid registry index ({what})")

        if not isinstance(index, dict) or not isinstance(index.get("models"), dict):
            raise bad("expected an object with 'format' and 'models'")
        if index.get("format") != INDEX_FORMAT:
            raise bad(f"format {index.get('format')!r}, this code reads format {INDEX_FORMAT}")
        for name, model in index["models"].items():
            if not (
                isinstance(model, dict)
                and isinstance(model.get("versions"), dict)
                and model["versions"]
                and all(
                    isinstance(v, dict) and {"sha256", "added"} <= v.keys()
                    for v in model["versions"].values()
                )
                and isinstance(model.get("aliases"), dict)
                and all(
                    isinstance(h, list) and h
                    and all(isinstance(v, str) and v in model["versions"] for v in h)
                    for h in model["aliases"].values()
                )
            ):
                raise bad(
                    f"model {name!r}: expected its versions (sha256, added) and aliases naming them"
                )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Holds the registry's lock (every read-modify-write of the index runs under it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.root / LOCK_FILE, timeout=self.lock_timeout)
        try:
            lock.acquire()
        except filelock.Timeout as exc:
            raise RegistryError(
                f"{lock.lock_file}: another registry command has held the lock for "
                f"{self.lock_timeout:g} s; try again when it has finished"
            ) from exc
        try:
            yield
        finally:
            lock.release()

    def _write_index(self, index: dict[str, Any]) -> None:
        """Replaces the index atomically (call under :meth:`_lock`)."""
        with atomic_open(self.index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    def _model(self, index: dict[str, Any], name: str) -> dict[str, Any]:
        model = index["models"].get(name)
        if model is None:
            known = ", ".join(sorted(index["models"])) or "none"
            raise RegistryError(f"{name}: no such model in {self.root} (models: {known})")
        return model

    def _find(self, index: dict[str, Any], ref: str) -> tuple[str, str]:
        """``(name, version)`` that ``ref`` names in ``index``."""
        name, target = split_ref(ref)
        model = self._model(index, name)
        versions, aliases = model["versions"], model["aliases"]
        if target is None:
            if DEFAULT_ALIAS in aliases:
                return name, aliases[DEFAULT_ALIAS][-1]
            return name, list(versions)[-1]
        if target in aliases:
            return name, aliases[target][-1]
        if len(target) >= MIN_PREFIX and _HEX.fullmatch(target):
            matches = [v for v in versions if v.startswith(target)]
            if len(matches) == 1:
                return name, matches[0]
            if matches:
                raise RegistryError(
                    f"{ref}: the prefix {target} matches versions {', '.join(matches)}: give more "
                    "digits"
                )
        raise RegistryError(
            f"{ref}: {name} has no alias or version {target!r} (aliases: "
            f"{', '.join(sorted(aliases)) or 'none'}; versions: {', '.join(versions)}; a "
            f"version prefix needs at least {MIN_PREFIX} hex digits)"
        )

    def _version(self, index: dict[str, Any], name: str, version: str) -> ModelVersion:
        model = index["models"][name]
        path = self.root / name / version
        try:
            card = read_card(path)
        except CardError as exc:
            raise RegistryError(f"{name}@{version}: its copy is damaged: {exc}") from exc
        return ModelVersion(
            name=name,
            version=version,
            path=path,
            aliases=tuple(sorted(a for a, h in model["aliases"].items() if h[-1] == version)),
            added=model["versions"][version]["added"],
            card=card,
        )

    @staticmethod
    def _point(model: dict[str, Any], alias: str, version: str) -> None:
        """Moves ``alias`` to ``version``, keeping the target it leaves in its history."""
        history = model["aliases"].setdefault(alias, [])
        if not history or history[-1] != version:
            history.append(version)

    # -- reading ---------------------------------------------------------------------------

    def resolve(self, ref: str) -> ModelVersion:
        """The version ``ref`` names: ``name@alias``, ``name@version`` (or a unique prefix of at
        least 6 hex digits), or ``name``: its ``production`` alias, else its newest version."""
        index = self._read_index()
        return self._version(index, *self._find(index, ref))

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """The versions of model ``name`` (of every model, by name, if None), oldest first."""
        index = self._read_index()
        names = [check_name(name)] if name is not None else sorted(index["models"])
        return [
            self._version(index, n, v) for n in names for v in self._model(index, n)["versions"]
        ]

    def aliases(self) -> dict[str, dict[str, str]]:
        """``{name: {alias: version}}``: where every alias points now."""
        index = self._read_index()
        return {
            name: {alias: history[-1] for alias, history in sorted(model["aliases"].items())}
            for name, model in sorted(index["models"].items())
        }

    # -- changing --------------------------------------------------------------------------

    def add(self, folder: str | os.PathLike, name: str, alias: str | None = None) -> ModelVersion:
        """Copies the export ``folder`` in as a version of model ``name`` (the same content
        again: the same version, not copied twice) and points ``alias`` at it if given.

        The folder's files are checked against its card first (RegistryError naming a changed
        or missing file); the copy is checked again, made read-only and renamed into
        ``<root>/<name>/<version>/`` before the index names it.
        """
        check_name(name)
        if alias is not None:
            check_alias(alias)
        folder = Path(folder)
        try:
            card = verify_folder(folder)
            card_bytes = (folder / CARD_FILE).read_bytes()
        except (CardError, OSError) as exc:
            raise RegistryError(f"{folder}: cannot be added: {exc}") from exc
        digest, version = card_digest(card_bytes)
        staged = None
        if version not in self._read_index()["models"].get(name, {}).get("versions", {}):
            staged = self._stage(folder, card, digest)
        try:
            with self._lock():
                index = self._read_index()
                model = index["models"].setdefault(name, {"versions": {}, "aliases": {}})
                known = model["versions"].get(version)
                if known is not None and known.get("sha256") != digest:
                    raise RegistryError(
                        f"{folder}: its id {version} is already {name}@{version} with other "
                        "content (a sha256 prefix collision)"
                    )
                if known is None:
                    if staged is None:  # removed since the check above
                        staged = self._stage(folder, card, digest)
                    target = self.root / name / version
                    if target.exists():  # left by an add killed before its index update
                        _delete_tree(target)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    staged.rename(target)
                    staged = None
                    target.chmod(0o555)
                    model["versions"][version] = {"sha256": digest, "added": _now()}
                if alias is not None:
                    self._point(model, alias, version)
                self._write_index(index)
                return self._version(index, name, version)
        finally:
            if staged is not None:
                _delete_tree(staged)

    def _stage(self, folder: Path, card: dict[str, Any], digest: str) -> Path:
        """A read-only, checked copy of the card's files in a hidden folder of the registry
        (removed on failure)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stage = self.root / f"{_STAGING}{secrets.token_hex(6)}"
        stage.mkdir()
        try:
            for file in [*card["files"], CARD_FILE]:
                if Path(file).name != file or file in (".", ".."):
                    raise RegistryError(
                        f"{folder / CARD_FILE}: lists {file!r}, which is not a file name"
                    )
                shutil.copyfile(folder / file, stage / file)
            try:
                verify_folder(stage)
            except CardError as exc:
                raise RegistryError(f"{folder}: changed while being copied ({exc})") from exc
            if hashlib.sha256((stage / CARD_FILE).read_bytes()).hexdigest() != digest:
                raise RegistryError(f"{folder / CARD_FILE}: changed while being copied")
            for file in stage.iterdir():
                file.chmod(0o444)
        except BaseException:
            _delete_tree(stage)
            raise
        return stage

    def promote(self, ref: str, alias: str) -> ModelVersion:
        """Points ``alias`` of the model at the version ``ref`` names (any reference form, e.g.
        ``demo-ctc@staging``); the target it leaves is kept for :meth:`rollback`."""
        check_alias(alias)
        with self._lock():
            index = self._read_index()
            name, version = self._find(index, ref)
            self._point(index["models"][name], alias, version)
            self._write_index(index)
            return self._version(index, name, version)

    def rollback(self, name: str, alias: str) -> ModelVersion:
        """Points ``name@alias`` back at its previous target; RegistryError if it has none."""
        check_alias(alias)
        with self._lock():
            index = self._read_index()
            model = self._model(index, check_name(name))
            history = model["aliases"].get(alias)
            if history is None:
                raise RegistryError(
                    f"{name}@{alias}: no such alias (aliases: "
                    f"{', '.join(sorted(model['aliases'])) or 'none'})"
                )
            if len(history) < 2:
                raise RegistryError(
                    f"{name}@{alias}: no previous target to roll back to (it has only pointed "
                    f"at {history[-1]})"
                )
            history.pop()
            self._write_index(index)
            return self._version(index, name, history[-1])

    def remove(self, ref: str) -> None:
        """Deletes the version ``name@version`` (its files and its entry, the entries of its
        aliases' histories too); refused while an alias points at it."""
        name, target = split_ref(ref)
        with self._lock():
            index = self._read_index()
            model = self._model(index, name)
            if target is None or target in model["aliases"]:
                raise RegistryError(
                    f"{ref}: remove takes name@version (a version id or prefix), not an alias"
                )
            name, version = self._find(index, ref)
            pointing = sorted(a for a, h in model["aliases"].items() if h[-1] == version)
            if pointing:
                raise RegistryError(
                    f"{name}@{version} is the target of {name}@{', '.join(pointing)}: promote "
                    "another version to it first"
                )
            del model["versions"][version]
            for history in model["aliases"].values():
                kept = [v for v in history if v != version]
                history[:] = [v for i, v in enumerate(kept) if i == 0 or v != kept[i - 1]]
            if not model["versions"]:
                del index["models"][name]
            self._write_index(index)
            # The index no longer names the files; a crash before they are gone leaves an
            # orphan folder, which the next add of the same content replaces.
            path = self.root / name / version
            if path.exists():
                _delete_tree(path)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the model's folder, once empty


# -- command line ------------------------------------------------------------------------------


def _wer_summary(card: dict[str, Any]) -> str:
    """``test-clean 3.21, test-other 8.40``: the WER % of the card's test-search rows."""
    rows = [r for r in card.get("test_results") or [] if r.get("search") == "test search"]
    return ", ".join(f"{r['test_set']} {r['WER']:.2f}" for r in rows) or "-"


def _table(versions: list[ModelVersion]) -> str:
    rows = [("NAME", "VERSION", "ALIASES", "ADDED", "WER %")] + [
        (v.name, v.version, ",".join(v.aliases) or "-", v.added, _wer_summary(v.card))
        for v in versions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def describe(version: ModelVersion) -> dict[str, Any]:
    """What ``show`` prints: the version's place in the registry and its card's summary."""
    card = version.card
    return {
        "ref": version.ref,
        "name": version.name,
        "version": version.version,
        "path": str(version.path),
        "aliases": list(version.aliases),
        "added": version.added,
        "family": card.get("family"),
        "architecture": card.get("architecture"),
        "parameters": card.get("parameters"),
        "test_results": card.get("test_results", []),
        "created": card.get("created"),
        "files": card["files"],
    }


def _parser() -> argparse.ArgumentParser:
    models_help = f"the registry folder (default: ${ENV_VAR}, else {DEFAULT_ROOT})"
    p = argparse.ArgumentParser(
        prog="python -m mamba_asr.registry",
        description="Keep exported models as immutable versions with aliases.",
        allow_abbrev=False,
    )
    p.add_argument("--models", default=None, help=models_help)
    # Also accepted after the command; SUPPRESS keeps an absent one from hiding the first.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models", default=argparse.SUPPRESS, help=models_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common],
                              allow_abbrev=False)

    add = command("add", "copy an export folder in as a version; prints its id last")
    add.add_argument("folder", help="an export folder (written by export.py)")
    add.add_argument("--name", required=True, help="the model's name, e.g. demo-ctc")
    add.add_argument("--alias", help="point this alias at the version, e.g. staging")
    lst = command("list", "a table of the versions")
    lst.add_argument("name", nargs="?", help="only this model's versions")
    show = command("show", "a version's details as JSON")
    show.add_argument("ref", help="name, name@alias or name@version")
    promote = command("promote", "point an alias at a version")
    promote.add_argument("ref", help="name@version (or name@alias)")
    promote.add_argument("--to", required=True, dest="alias", help="the alias, e.g. production")
    rollback = command("rollback", "point an alias back at its previous target")
    rollback.add_argument("name", help="the model's name")
    rollback.add_argument("--alias", required=True, help="the alias, e.g. production")
    remove = command("remove", "delete a version no alias points at")
    remove.add_argument("ref", help="name@version")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; a registry error is one ``error:`` line on stderr and status 1."""
    args = _parser().parse_args(argv)
    registry = Registry(args.models or default_root())
    try:
        if args.command == "add":
            version = registry.add(args.folder, args.name, args.alias)
            print(f"{version.ref}: {version.path}" + (
                f" ({', '.join(version.aliases)})" if version.aliases else ""))
            print(version.version)
        elif args.command == "list":
            versions = registry.versions(args.name)
            if versions:
                print(_table(versions))
            else:
                print(f"{registry.root}: no models (add one with python -m mamba_asr.registry "
                      "add <export folder> --name NAME)")
        elif args.command == "show":
            print(json.dumps(describe(registry.resolve(args.ref)), indent=2))
        elif args.command == "promote":
            version = registry.promote(args.ref, args.alias)
            print(f"{version.name}@{args.alias} -> {version.version}")
        elif args.command == "rollback":
            version = registry.rollback(args.name, args.alias)
            print(f"{version.name}@{args.alias} -> {version.version}")
        elif args.command == "remove":
            registry.remove(args.ref)
            print(f"removed {args.ref}")
    except (RegistryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
