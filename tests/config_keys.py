"""Checks the recipe tests run on a family of configurations (``hparams/<family>/*.yaml``).

Which keys a recipe uses is read from its code (parsed with ``ast``): string constants other
than docstrings, and attribute names; comments and docstrings do not count.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from speechbrain.utils.run_opts import RunOptions


def top_keys(path: Path) -> list[str]:
    """The top-level keys of a YAML file, in order."""
    return re.findall(r"^([A-Za-z_][\w]*):", path.read_text(encoding="utf-8"), flags=re.M)


def is_conmamba(path: Path) -> bool:
    """Whether the configuration builds a ConMamba encoder."""
    return "encoder_module: conmamba" in path.read_text(encoding="utf-8")


def _trees(scripts: Iterable[Path]) -> list[ast.Module]:
    """The parsed scripts."""
    return [ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in scripts]


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes of the module, its classes and functions."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }


def code_names(scripts: Iterable[Path]) -> set[str]:
    """The string constants (docstrings excluded) and attribute names in the scripts' code."""
    names: set[str] = set()
    for tree in _trees(scripts):
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docstrings):
                names.add(node.value)
    return names


def _is_hparams(node: ast.expr) -> bool:
    """``hparams`` or ``<anything>.hparams``."""
    return (isinstance(node, ast.Name) and node.id == "hparams") or (
        isinstance(node, ast.Attribute) and node.attr == "hparams"
    )


def is_dct(path: Path) -> bool:
    """Whether the configuration trains with SpeechBrain's Dynamic Chunk Training."""
    return "\ndynchunktrain_config_sampler:" in path.read_text(encoding="utf-8")


def assert_family_shares_keys(
    folder: Path, names: list[str], model_keys: list[str],
    optional: dict[str, tuple[list[str], Callable[[Path], bool]]] | None = None,
) -> None:
    """Every configuration has conformer_large's keys in its order, plus ``model_keys``
    exactly when it builds a ConMamba encoder, and each ``optional`` group's keys exactly when
    its test says the configuration has that feature."""
    groups = {"model": (model_keys, is_conmamba), **(optional or {})}
    extra = {k for keys, _ in groups.values() for k in keys}
    reference = top_keys(folder / "conformer_large.yaml")
    for name in names:
        path = folder / f"{name}.yaml"
        keys = top_keys(path)
        assert [k for k in keys if k not in extra] == reference, name
        for group, (group_keys, has) in groups.items():
            assert has(path) == all(k in keys for k in group_keys), (name, group)


def assert_every_key_used(folder: Path, names: list[str], scripts: Iterable[Path]) -> None:
    """Each top-level key is named in the scripts' code (:func:`code_names`), referenced in
    its YAML or a run option."""
    in_code = code_names(scripts)
    run_options = {f.name for f in dataclasses.fields(RunOptions)}
    for name in names:
        text = (folder / f"{name}.yaml").read_text(encoding="utf-8")
        for key in top_keys(folder / f"{name}.yaml"):
            used = (
                key.startswith("__")
                or key in run_options
                or f"<{key}>" in text
                or key in in_code
            )
            assert used, f"{name}.yaml: {key} is used neither by the recipe nor by the YAML"


def keys_read(scripts: Iterable[Path]) -> set[str]:
    """Keys the scripts' code reads as ``hparams["key"]`` or ``hparams.key`` (also through
    ``self.hparams``); ``hparams.get`` is not a key."""
    read: set[str] = set()
    for tree in _trees(scripts):
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_hparams(node.value):
                read.add(node.attr)
            elif (isinstance(node, ast.Subscript) and _is_hparams(node.value)
                  and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
                read.add(node.slice.value)
    return read - {"get"}


def assert_declared_keys_present(declared: set[str], folder: Path, names: list[str]) -> None:
    """Every configuration defines the keys the recipe declares."""
    for name in names:
        keys = set(top_keys(folder / f"{name}.yaml"))
        assert declared <= keys, (name, sorted(declared - keys))


# The demo configurations of a family (ConMamba, without it in their names).
DEMO_CONFIGS = ("demo", "finetune_demo")


def assert_finetunes_demo(finetune: dict, demo: dict) -> None:
    """A fine-tuning demo configuration (loaded) adapts its family's demo model: the same
    architecture (parameter names and shapes), initialised from the run the demo leaves, on
    demo-corpus adapt splits (valid: adapt-dev; test: adapt-test and test-clean, whose
    manifests the test stage reads), in its own output folder."""
    from mamba_asr.demo_corpus.corpus import SPLITS

    def shapes(hparams: dict) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in hparams["model"].state_dict().items()}

    assert shapes(finetune) == shapes(demo)
    assert finetune["init_from"] == demo["output_folder"]
    assert finetune["output_folder"] != demo["output_folder"]
    assert (finetune["train_splits"], finetune["dev_splits"]) == (["adapt-train"], ["adapt-dev"])
    assert finetune["test_splits"] == ["adapt-test", "test-clean"]
    splits = finetune["train_splits"] + finetune["dev_splits"] + finetune["test_splits"]
    assert set(splits) <= set(SPLITS)  # the corpus has them
    prep = Path(finetune["prep_folder"])
    assert Path(finetune["valid_csv"]) == prep / "adapt-dev.csv"
    assert [Path(p) for p in finetune["test_csv"]] == [
        prep / f"{split}.csv" for split in finetune["test_splits"]
    ]


# The Mamba keys only the ConMamba configurations of a family have.
MAMBA_KEYS = ["d_state", "expand", "d_conv", "bidirectional", "mamba_init", "mamba_config"]
# Keys of the streaming configurations (``*streaming*.yaml``) only.
STREAMING_KEYS = ["causal"]
# The keys only the Dynamic Chunk Training (streaming Conformer) configurations have.
DCT_KEYS = ["stream_chunk_size", "stream_left_context", "dynchunktrain_config_sampler"]


def assert_asr_family(
    folder: Path, declared: Iterable[str], scripts: Iterable[Path], sample_read: set[str]
) -> None:
    """The checks every ASR family (``hparams/CTC``, ``hparams/S2S``) passes: its files differ
    only where the model does (the Mamba keys of ConMamba ones, which the demo is); every key
    is used; the recipe's declared ``KEYS`` (which ``load_config`` checks up front) hold the
    shared recipe keys and every key its code reads (``sample_read`` among them: the reading
    works), and every configuration defines them."""
    from mamba_asr.brain import RECIPE_KEYS  # SpeechBrain: imported only by the recipe tests
    from mamba_asr.data import DATA_KEYS

    scripts, declared = list(scripts), set(declared)
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert_family_shares_keys(folder, names, MAMBA_KEYS, {
        "streaming": (STREAMING_KEYS, lambda path: "streaming" in path.stem),
        "dct": (DCT_KEYS, is_dct),
    })
    for name in names:
        conmamba = "conmamba" in name or name in DEMO_CONFIGS
        assert is_conmamba(folder / f"{name}.yaml") == conmamba, name
    assert_every_key_used(folder, names, scripts)
    assert set(RECIPE_KEYS) | set(DATA_KEYS) <= declared
    read = keys_read(scripts) | {"valid_search", "test_search"}  # read as hparams[key] in a loop
    assert read <= declared, sorted(read - declared)
    assert sample_read <= read
    assert_declared_keys_present(declared, folder, names)
