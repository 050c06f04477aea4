"""The configuration-key checks read a recipe's code, not its comments or docstrings."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_keys import assert_every_key_used, code_names, keys_read

RECIPE = '''"""A recipe whose docstrings name doc_key and hparams["doc_read"]."""


def step(hparams, brain):
    """Reads hparams.doc_attr."""
    # comment_key, hparams["comment_read"]
    text = "also mentions other_key"
    return hparams["read_key"] + brain.hparams.attr_key + hparams.get("optional_key"), text
'''


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    return path


def test_code_names_skip_docstrings_and_comments(recipe: Path) -> None:
    names = code_names([recipe])
    assert {"read_key", "attr_key", "optional_key", "get", "hparams"} <= names
    assert not names & {"doc_key", "doc_read", "doc_attr", "comment_key", "comment_read"}
    assert "other_key" not in names  # inside a longer string: not a key
    assert keys_read([recipe]) == {"read_key", "attr_key"}


def test_key_named_only_in_a_docstring_or_comment_is_unused(recipe: Path, tmp_path: Path) -> None:
    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "used.yaml").write_text(
        "seed: 4\nread_key: !ref <seed>\nattr_key: 2\noptional_key: 3\ndevice: cpu\n"
    )
    assert_every_key_used(folder, ["used"], [recipe])  # seed: referenced; device: a run option
    for key in ("doc_key", "doc_read", "comment_key", "other_key"):
        (folder / f"{key}.yaml").write_text(f"read_key: 1\n{key}: 2\n")
        with pytest.raises(AssertionError, match=f"{key}.yaml: {key} is used neither"):
            assert_every_key_used(folder, [key], [recipe])
