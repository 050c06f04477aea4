"""The SpeechBrain internals our code relies on: an upgrade that changes one fails here, naming
what changed and which of our code relies on it.

Read from our code (the recipe scripts and every module of mamba_asr/ and modules/):

* methods our subclasses of SpeechBrain classes override: SpeechBrain calls them, so they take
  SpeechBrain's parameters (names and kinds, in order; a constructor may add its own);
* SpeechBrain's private methods our code uses (``x._name`` where a SpeechBrain class we
  subclass defines ``_name``, or ``from speechbrain... import _name``): their signatures are
  pinned in ``PRIVATE``, as read from the SpeechBrain of requirements.txt.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import speechbrain as sb
from conftest import REPO
from speechbrain.utils.checkpoints import Checkpointer

from mamba_asr.brain import TrainingBrain
from mamba_asr.checkpoints import AtomicCheckpointer

# SpeechBrain's private functions our code calls, with their signatures in SpeechBrain 1.1.2.
PRIVATE = {
    "Brain._compile": "(self)",
    "Brain._wrap_distributed": "(self)",
    "Checkpointer._new_checkpoint_dirpath": "(self)",
    "Checkpointer._custom_checkpoint_dirpath": "(self, name)",
    "Checkpointer._list_checkpoint_dirs": "(self)",
    "InputNormalization._save": "(self, path)",  # its checkpoint saver (export_untrained)
}


def our_modules() -> list[ModuleType]:
    """The recipe scripts (the top-level files with a ``__main__`` guard) and every module of
    mamba_asr/ and modules/, imported."""
    names = [p.stem for p in sorted(REPO.glob("*.py"))
             if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")]
    for package in ("mamba_asr", "modules"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] != "__main__":
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [importlib.import_module(name) for name in names]


def _is_speechbrain(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "speechbrain"


def _our_classes(modules: list[ModuleType]) -> list[type]:
    return [c for m in modules for c in vars(m).values()
            if inspect.isclass(c) and c.__module__ == m.__name__]


def _file(obj: Any) -> str:
    return str(Path(inspect.getsourcefile(obj)).relative_to(REPO))


def _params(fn: Callable) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


# --------------------------------------------------------------------------- overrides


@dataclass(frozen=True)
class Override:
    """``ours`` (a method of our class) overrides SpeechBrain's ``theirs``, named ``key``."""

    key: str
    ours: Callable
    theirs: Callable


def overrides() -> list[Override]:
    """Every method of our classes that a SpeechBrain class in its MRO also defines."""
    found = []
    for cls in _our_classes(our_modules()):
        for name, ours in vars(cls).items():
            owner = next((b for b in cls.__mro__[1:] if _is_speechbrain(b) and name in vars(b)),
                         None)
            if owner is not None and inspect.isfunction(ours):
                found.append(Override(f"{owner.__name__}.{name}", ours, getattr(owner, name)))
    return found


def _compatible(ours: Callable, theirs: Callable, constructor: bool) -> bool:
    """SpeechBrain's parameters; a method may add parameters with defaults after them, a
    constructor may forward ``*args, **kwargs`` or add parameters with defaults around
    SpeechBrain's (in their order)."""
    mine, speechbrains = _params(ours), _params(theirs)
    if not constructor:  # SpeechBrain's, then only parameters SpeechBrain need not pass
        added = list(inspect.signature(ours).parameters.values())[len(speechbrains):]
        return mine[:len(speechbrains)] == speechbrains and all(
            p.default is not p.empty for p in added)
    var = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    if [kind for _, kind in mine[1:]] == sorted(var):
        return True
    rest = iter(mine)
    if not all(p in rest for p in speechbrains):  # a subsequence of ours
        return False
    extra = inspect.signature(ours).parameters.values()
    return all(p.kind in var or p.default is not p.empty
               for p in extra if (p.name, p.kind) not in speechbrains)


def override_problems() -> list[str]:
    """One line per override whose parameters are no longer SpeechBrain's."""
    problems = []
    for o in overrides():
        if not _compatible(o.ours, o.theirs, o.key.endswith(".__init__")):
            problems.append(
                f"SpeechBrain {sb.__version__} has {o.key}{inspect.signature(o.theirs)}, which "
                f"{_file(o.ours)} {o.ours.__qualname__}{inspect.signature(o.ours)} overrides: "
                "SpeechBrain calls it with its own parameters"
            )
    return problems


# --------------------------------------------------------------------------- private methods


@dataclass(frozen=True)
class PrivateUse:
    """Our code at ``where`` (file and qualified name) uses SpeechBrain's ``key``, which is
    ``target`` (None: SpeechBrain has no such name)."""

    key: str
    target: Callable | None
    where: str


class _Uses(ast.NodeVisitor):
    """The uses of ``names`` (attributes) and of private speechbrain imports in a module."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.scope, self.found = names, [], []

    def _scoped(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def _where(self) -> str:
        return ".".join(self.scope) or "<module>"

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in self.names:
            self.found.append((node.attr, None, self._where()))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] == "speechbrain":
            for alias in node.names:
                if alias.name.startswith("_"):
                    self.found.append((alias.name, node.module, self._where()))


def private_uses() -> list[PrivateUse]:
    """SpeechBrain's private names our code uses (see the module docstring). Names that a class
    of ours defines or that our code assigns are ours, not SpeechBrain's."""
    modules = our_modules()
    classes = _our_classes(modules)
    trees = {m: ast.parse(Path(m.__file__).read_text(encoding="utf-8")) for m in modules}
    ours = {name for cls in classes for name in vars(cls)}
    ours |= {n.attr for tree in trees.values() for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    owners: dict[str, str] = {k.split(".")[-1]: k.rsplit(".", 1)[0] for k in PRIVATE}
    for cls in classes:
        for base in cls.__mro__:
            if _is_speechbrain(base):
                owners.update({n: base.__name__ for n in vars(base)
                               if n.startswith("_") and not n.startswith("__")})
    speechbrain_classes = {b.__name__: b for c in classes for b in c.__mro__ if _is_speechbrain(b)}
    uses = []
    for module, tree in trees.items():
        visitor = _Uses(set(owners) - ours)
        visitor.visit(tree)
        for name, source, where in visitor.found:
            owner = importlib.import_module(source) if source else speechbrain_classes.get(
                owners[name])
            key = f"{source}.{name}" if source else f"{owners[name]}.{name}"
            target = getattr(owner, name, None) if owner is not None else None
            uses.append(PrivateUse(key, target, f"{_file(module)} {where}"))
    return uses


def private_problems() -> list[str]:
    """One line per private SpeechBrain function our code uses whose signature is not the one
    pinned in ``PRIVATE`` (or that is gone, or not pinned), and per stale pin."""
    problems, uses = [], private_uses()
    for use in uses:
        if use.target is None:
            problems.append(f"SpeechBrain {sb.__version__} has no {use.key} any more: "
                            f"{use.where} relies on it")
            continue
        now = str(inspect.signature(use.target))
        if use.key not in PRIVATE:
            problems.append(f"{use.where} uses SpeechBrain's private {use.key}{now}: pin its "
                            "signature in PRIVATE (tests/test_speechbrain_api.py)")
        elif now != PRIVATE[use.key]:
            problems.append(f"SpeechBrain {sb.__version__} changed {use.key}{PRIVATE[use.key]} "
                            f"-> {use.key}{now}: {use.where} relies on it")
    stale = sorted(set(PRIVATE) - {use.key for use in uses})
    if stale:
        problems.append(f"PRIVATE pins {', '.join(stale)}, which our code no longer uses")
    return problems


# --------------------------------------------------------------------------- tests


def test_overrides_take_speechbrains_parameters() -> None:
    found = {o.key for o in overrides()}
    assert {"Brain.optimizers_step", "Brain.on_fit_start", "Brain.on_stage_start",
            "Checkpointer.save_checkpoint", "Checkpointer.list_checkpoints",
            "TransformerASR._init_params", "S2STransformerBeamSearcher.forward_step"} <= found
    problems = override_problems()
    assert not problems, "\n".join(problems)


def test_private_speechbrain_functions_keep_their_signatures() -> None:
    assert {use.key for use in private_uses()} == set(PRIVATE)
    problems = private_problems()
    assert not problems, "\n".join(problems)


def test_a_changed_speechbrain_fails_naming_what_relies_on_it(monkeypatch) -> None:
    recipe, checkpoints = _file(TrainingBrain), _file(AtomicCheckpointer)
    monkeypatch.setattr(sb.Brain, "_compile", lambda self, mode="default": None)
    monkeypatch.delattr(Checkpointer, "_list_checkpoint_dirs")

    def save_checkpoint(self, meta=None, end_of_epoch=True, name=None, verbosity=20, keep=1):
        """A new parameter."""

    monkeypatch.setattr(Checkpointer, "save_checkpoint", save_checkpoint)
    assert set(private_problems()) == {
        f"SpeechBrain {sb.__version__} changed Brain._compile(self) -> "
        f"Brain._compile(self, mode='default'): {recipe} TrainingBrain.on_fit_start relies on it",
        f"SpeechBrain {sb.__version__} has no Checkpointer._list_checkpoint_dirs any more: "
        f"{checkpoints} AtomicCheckpointer.list_checkpoints relies on it",
    }
    (problem,) = override_problems()
    assert problem.startswith(
        f"SpeechBrain {sb.__version__} has Checkpointer.save_checkpoint(self, meta=None, "
        f"end_of_epoch=True, name=None, verbosity=20, keep=1), which {checkpoints} "
        "AtomicCheckpointer.save_checkpoint(self, meta: "
    )
