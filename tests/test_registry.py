"""mamba_asr.registry: export folders copied in as read-only, content-addressed versions;
references by alias, version, prefix and bare name; promote, rollback and guarded remove; its
command line (the id on the last line, one error line); a damaged index or export refused by
name; concurrent adds from several processes lose no entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import filelock
import pytest
from conftest import REPO

from mamba_asr.export import export_untrained
from mamba_asr.model_card import CARD_FILE, read_card
from mamba_asr.registry import ENV_VAR, INDEX_FILE, Registry, RegistryError


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two export folders of the demo CTC model with different random weights."""
    root = tmp_path_factory.mktemp("exports")
    for seed in (1, 2):
        export_untrained("hparams/CTC/demo.yaml", root / f"seed{seed}",
                         overrides=["--seed", str(seed)])
    return root / "seed1", root / "seed2"


def version_id(folder: Path) -> str:
    return hashlib.sha256((folder / CARD_FILE).read_bytes()).hexdigest()[:12]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mamba_asr.registry", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_add_copies_the_export_as_a_read_only_version(tmp_path: Path, exports) -> None:
    a, _ = exports
    root = tmp_path / "new" / "registry"  # created by add
    version = Registry(root).add(a, "demo-ctc")
    assert version.version == version_id(a) and version.ref == f"demo-ctc@{version_id(a)}"
    assert version.path == root / "demo-ctc" / version.version and version.aliases == ()
    card = read_card(a)
    assert version.card == card
    assert sorted(p.name for p in version.path.iterdir()) == sorted([*card["files"], CARD_FILE])
    for copy in version.path.iterdir():
        assert copy.read_bytes() == (a / copy.name).read_bytes()
        assert mode(copy) == 0o444, copy
    assert mode(version.path) == 0o555
    index = json.loads((root / INDEX_FILE).read_text())
    assert index["format"] == 1 and list(index["models"]) == ["demo-ctc"]
    assert sorted(p.name for p in root.iterdir()) == [".lock", "demo-ctc", INDEX_FILE]


def test_adding_the_same_content_again_is_the_same_version(tmp_path: Path, exports) -> None:
    a, _ = exports
    registry = Registry(tmp_path)
    first = registry.add(a, "demo-ctc")
    inode = (first.path / "asr.ckpt").stat().st_ino
    again = registry.add(a, "demo-ctc", alias="production")
    assert again.version == first.version and again.aliases == ("production",)
    assert (again.path / "asr.ckpt").stat().st_ino == inode  # not copied a second time
    assert [v.ref for v in registry.versions()] == [first.ref]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "demo-ctc", INDEX_FILE]
    assert [p.name for p in (tmp_path / "demo-ctc").iterdir()] == [first.version]


def test_references_by_alias_version_prefix_and_bare_name(tmp_path: Path, exports) -> None:
    a, b = exports
    registry = Registry(tmp_path)
    va = registry.add(a, "demo-ctc", alias="production").version
    vb = registry.add(b, "demo-ctc", alias="staging").version
    registry.add(a, "other")
    registry.add(b, "other")
    assert registry.resolve("demo-ctc").version == va  # its production alias
    assert registry.resolve("other").version == vb  # no production: the newest
    assert registry.resolve("demo-ctc@staging").version == vb
    assert registry.resolve(f"demo-ctc@{vb}").version == vb
    assert registry.resolve(f"demo-ctc@{vb[:6]}").version == vb
    assert registry.resolve("demo-ctc@production").aliases == ("production",)
    assert registry.aliases() == {"demo-ctc": {"production": va, "staging": vb}, "other": {}}
    assert [v.ref for v in registry.versions("demo-ctc")] == [f"demo-ctc@{va}", f"demo-ctc@{vb}"]
    with pytest.raises(RegistryError, match=r"missing: no such model in .* \(models: demo-ctc, o"):
        registry.resolve("missing@production")
    with pytest.raises(RegistryError, match="no alias or version 'canary'.*staging"):
        registry.resolve("demo-ctc@canary")
    with pytest.raises(RegistryError, match="at least 6 hex digits"):
        registry.resolve(f"demo-ctc@{vb[:5]}")
    with pytest.raises(RegistryError, match="'Demo-CTC'"):
        registry.resolve("Demo-CTC")
    index = json.loads((tmp_path / INDEX_FILE).read_text())  # a second id with va's prefix
    versions = index["models"]["demo-ctc"]["versions"]
    twin = va[:6] + ("1" if va[6] == "0" else "0") * 6
    versions[twin] = versions[va]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(RegistryError, match=f"prefix {va[:6]} matches versions {va}, {twin}"):
        registry.resolve(f"demo-ctc@{va[:6]}")
    assert registry.resolve(f"demo-ctc@{va[:7]}").version == va


def test_promote_and_rollback_move_an_alias_along_its_history(tmp_path: Path, exports) -> None:
    a, b = exports
    registry = Registry(tmp_path)
    va = registry.add(a, "demo-ctc", alias="production").version
    vb = registry.add(b, "demo-ctc").version
    assert registry.promote(f"demo-ctc@{vb}", "production").aliases == ("production",)
    assert registry.promote("demo-ctc@production", "production").version == vb  # no new entry
    assert registry.resolve("demo-ctc@production").version == vb
    assert registry.rollback("demo-ctc", "production").version == va
    assert registry.aliases()["demo-ctc"] == {"production": va}
    with pytest.raises(RegistryError, match=f"demo-ctc@production: no previous target.*{va}"):
        registry.rollback("demo-ctc", "production")
    with pytest.raises(RegistryError, match="demo-ctc@canary: no such alias"):
        registry.rollback("demo-ctc", "canary")
    assert registry.promote("demo-ctc@production", "staging").aliases == ("production", "staging")


def test_remove_is_refused_while_an_alias_points_at_the_version(tmp_path: Path, exports) -> None:
    a, b = exports
    registry = Registry(tmp_path)
    va = registry.add(a, "demo-ctc", alias="production").version
    registry.promote(f"demo-ctc@{va}", "staging")
    vb = registry.add(b, "demo-ctc").version
    with pytest.raises(RegistryError, match=f"demo-ctc@{va} is the target of "
                                            r"demo-ctc@production, staging"):
        registry.remove(f"demo-ctc@{va}")
    with pytest.raises(RegistryError, match="not an alias"):
        registry.remove("demo-ctc@production")
    registry.promote(f"demo-ctc@{vb}", "production")
    registry.promote(f"demo-ctc@{vb}", "staging")
    registry.remove(f"demo-ctc@{va[:8]}")
    assert not (tmp_path / "demo-ctc" / va).exists()
    assert [v.version for v in registry.versions()] == [vb]
    with pytest.raises(RegistryError, match="no previous target"):  # not back to a removed one
        registry.rollback("demo-ctc", "production")
    with pytest.raises(RegistryError, match=f"no alias or version '{va}'"):
        registry.resolve(f"demo-ctc@{va}")
    registry.promote(f"demo-ctc@{vb}", "production")  # unchanged
    other = registry.add(a, "other")
    registry.remove(other.ref)
    assert "other" not in registry.aliases() and not (tmp_path / "other").exists()


def test_a_changed_or_incomplete_export_is_refused_naming_the_file(
    tmp_path: Path, exports
) -> None:
    a, _ = exports
    changed = tmp_path / "changed"
    shutil.copytree(a, changed)
    with open(changed / "asr.ckpt", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(a, incomplete)
    (incomplete / "tokenizer.ckpt").unlink()
    root = tmp_path / "registry"
    registry = Registry(root)
    with pytest.raises(RegistryError, match=r"changed/asr\.ckpt: changed since export"):
        registry.add(changed, "demo-ctc")
    with pytest.raises(RegistryError, match=r"incomplete/tokenizer\.ckpt: missing"):
        registry.add(incomplete, "demo-ctc")
    with pytest.raises(RegistryError, match="is not an exported model folder"):
        registry.add(tmp_path, "demo-ctc")
    assert not root.exists()


@pytest.mark.parametrize("name", ["Demo", "-demo", "demo/ctc", "demo ctc", ""])
def test_a_bad_model_name_is_refused(tmp_path: Path, exports, name: str) -> None:
    with pytest.raises(RegistryError, match=f"model name {name!r}: expected lowercase"):
        Registry(tmp_path).add(exports[0], name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("alias", "problem"), [
    ("Production", "expected lowercase"), ("2024", "expected lowercase"),
    ("beta.1", "expected lowercase"), ("deadbeef", "reads as a version id"),
    ("abc123", "reads as a version id"),
])
def test_a_bad_alias_is_refused(tmp_path: Path, exports, alias: str, problem: str) -> None:
    with pytest.raises(RegistryError, match=f"alias {alias!r}: .*{problem}"):
        Registry(tmp_path).add(exports[0], "demo-ctc", alias=alias)
    assert list(tmp_path.iterdir()) == []
    assert Registry(tmp_path).add(exports[0], "demo-ctc", alias="abc12").aliases == ("abc12",)


@pytest.mark.parametrize("text", ["{\"format\": 1, \"mod", "[]", "{\"format\": 9, \"models\": {}}",
                                  "{\"format\": 1, \"models\": {\"x\": {\"versions\": {}}}}"])
def test_a_damaged_index_is_an_error_naming_it(tmp_path: Path, exports, text: str) -> None:
    (tmp_path / INDEX_FILE).write_text(text)
    registry = Registry(tmp_path)
    for call in (registry.versions, lambda: registry.resolve("x"),
                 lambda: registry.add(exports[0], "demo-ctc")):
        with pytest.raises(RegistryError, match=f"{tmp_path / INDEX_FILE}: not a valid registry"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_FILE]  # nothing copied
    assert (tmp_path / INDEX_FILE).read_text() == text


def test_a_held_lock_is_an_error_naming_it(tmp_path: Path, exports) -> None:
    registry = Registry(tmp_path, lock_timeout=0.2)
    version = registry.add(exports[0], "demo-ctc")
    with filelock.FileLock(tmp_path / ".lock"):
        with pytest.raises(RegistryError, match=r"\.lock: another registry command has held"):
            registry.promote(version.ref, "production")
    assert registry.aliases() == {"demo-ctc": {}}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


def test_command_line(tmp_path: Path, exports) -> None:
    a, b = exports
    env = {ENV_VAR: str(tmp_path)}
    added = cli("add", a, "--name", "demo-ctc", "--alias", "production", env=env)
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[-1] == version_id(a)
    added = cli("add", b, "--name", "demo-ctc", "--models", tmp_path)  # after the command
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[-1] == version_id(b)
    promoted = cli("--models", tmp_path, "promote", f"demo-ctc@{version_id(b)}", "--to",
                   "production")
    assert promoted.stdout == f"demo-ctc@production -> {version_id(b)}\n"
    shown = json.loads(cli("show", "demo-ctc", env=env).stdout)
    assert shown["version"] == version_id(b) and shown["aliases"] == ["production"]
    assert shown["files"] == read_card(b)["files"]
    assert shown["path"] == str(tmp_path / "demo-ctc" / version_id(b))
    listed = cli("list", env=env).stdout.splitlines()
    assert listed[0].split() == ["NAME", "VERSION", "ALIASES", "ADDED", "WER", "%"]
    assert [row.split()[:3] for row in listed[1:]] == [
        ["demo-ctc", version_id(a), "-"], ["demo-ctc", version_id(b), "production"]]
    rolled = cli("rollback", "demo-ctc", "--alias", "production", env=env)
    assert rolled.stdout == f"demo-ctc@production -> {version_id(a)}\n"

    refused = cli("remove", f"demo-ctc@{version_id(a)}", env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (f"error: demo-ctc@{version_id(a)} is the target of "
                              "demo-ctc@production: promote another version to it first\n")
    bad = cli("add", tmp_path / "nowhere", "--name", "demo-ctc", env=env)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == f"error: {tmp_path / 'nowhere'}: cannot be added: " \
                         f"{tmp_path / 'nowhere'}: no such model folder\n"
    empty = cli("list", "--models", tmp_path / "none")
    assert empty.returncode == 0 and "no models" in empty.stdout
    assert not (tmp_path / "none").exists()


def test_a_damaged_index_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / INDEX_FILE).write_text("not json")
    listed = cli("list", "--models", tmp_path)
    assert listed.returncode == 1 and listed.stdout == ""
    assert listed.stderr.startswith(f"error: {tmp_path / INDEX_FILE}: not a valid registry index")
    assert listed.stderr.count("\n") == 1


WORKER = """
import sys
from mamba_asr.registry import main
root, worker, *folders = sys.argv[1:]
for k, folder in enumerate(folders):
    assert main(["--models", root, "add", folder, "--name", f"w{worker}-{k}",
                 "--alias", "production"]) == 0
    assert main(["--models", root, "add", folder, "--name", "shared"]) == 0
"""


def test_concurrent_adds_lose_no_entry(tmp_path: Path, exports) -> None:
    a, b = exports
    root = tmp_path / "registry"
    workers, adds = 6, 4
    folders = [a if k % 2 else b for k in range(adds)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(w), *map(str, folders)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    index = json.loads((root / INDEX_FILE).read_text())  # valid JSON
    registry = Registry(root)
    expected = {f"w{w}-{k}": version_id(folders[k]) for w in range(workers) for k in range(adds)}
    assert {v.name: v.version for v in registry.versions() if v.name != "shared"} == expected
    assert {n: al["production"] for n, al in registry.aliases().items() if n != "shared"} \
        == expected
    assert sorted(index["models"]["shared"]["versions"]) == sorted([version_id(a), version_id(b)])
    assert sorted(p.name for p in (root / "shared").iterdir()) == sorted(
        [version_id(a), version_id(b)])
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [".lock"]
