"""The service's container recipe. No image registry is reachable here, so no image is built:
the Dockerfile is read instruction by instruction, and what it runs is run without Docker:
docker/install.sh without its OS step into a fresh virtual environment that reuses this
environment's packages, then the Dockerfile's CMD with its ENV until ``GET /ready`` answers."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
INSTALL_SH = REPO / "docker" / "install.sh"
CTC_DEMO = REPO / "hparams" / "CTC" / "demo.yaml"
# The base image's own environment, as far as the Dockerfile's ENV reads it.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, ARG, ENV, RUN, ...
    args: str  # the rest of the instruction, continuation lines joined


def read_instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile: comment lines dropped (inside continued instructions
    too, as Docker does), lines ending in a backslash joined to the next."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") or not (text or pending):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        if text:
            keyword, _, args = text.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends in a line continuation"
    return instructions


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str, variables: dict[str, str]) -> str:
    """Docker's ``$NAME`` / ``${NAME}`` substitution (an unset variable is empty)."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def image_env(instructions: list[Instruction], build_args: dict[str, str],
              base_env: dict[str, str]) -> dict[str, str]:
    """The environment of the image the last stage builds: ``base_env`` (the base image's),
    then each ENV, its values expanded with the ARG values (``build_args`` over the defaults)
    and the environment before that instruction."""
    args: dict[str, str] = {}
    env = dict(base_env)
    for ins in instructions:
        if ins.keyword == "FROM":  # ARGs before FROM only reach the FROM line
            args, env = {}, dict(base_env)
        elif ins.keyword == "ARG":
            name, has_default, default = ins.args.partition("=")
            args[name] = build_args.get(name, expand(default, {**args, **env}))
            assert has_default or name in build_args, f"ARG {name} has no default"
        elif ins.keyword == "ENV":
            variables = {**args, **env}
            for item in shlex.split(ins.args):
                key, is_pair, value = item.partition("=")
                assert is_pair, f"ENV {ins.args!r}: expected KEY=VALUE pairs"
                env[key] = expand(value, variables)
    return env


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in instructions if ins.keyword == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form CMD (a JSON list of strings: no shell between docker and it,
    so SIGTERM reaches the service itself)."""
    argv = json.loads(args)
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), args
    return argv


def healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    options, cmd, argv = last(instructions, "HEALTHCHECK").args.partition("CMD ")
    assert cmd, "HEALTHCHECK without CMD"
    return exec_form(argv)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's ``patterns`` keep ``relative`` (or a folder above it) out of the
    build context (no ``!`` exceptions: the file has none)."""
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pattern.removeprefix("**/")) or fnmatch.fnmatch(p, pattern)
               for p in prefixes for pattern in patterns)


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "ignored() reads no exceptions"
    return patterns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dockerfile_installs_with_the_script_and_serves_as_a_non_root_user():
    instructions = read_instructions(DOCKERFILE)
    keywords = [ins.keyword for ins in instructions]
    # The base image is a build argument: slim Python by default, a CUDA image on demand.
    assert instructions[0] == Instruction("ARG", "BASE_IMAGE=python:3.11-slim")
    assert [ins.args for ins in instructions if ins.keyword == "FROM"] == ["${BASE_IMAGE}"]

    env = image_env(instructions, {}, BASE_ENV)
    assert env["MAMBA_ASR_HOST"] == "0.0.0.0"  # reachable through a published port
    assert last(instructions, "EXPOSE").args == env["MAMBA_ASR_PORT"]
    assert env["MAMBA_ASR_DEVICE"] == "cpu"
    assert image_env(instructions, {"DEVICE": "cuda"}, BASE_ENV)["MAMBA_ASR_DEVICE"] == "cuda"
    # `python` is the virtual environment's, ahead of the base image's PATH.
    assert env["PATH"] == f"{env['VIRTUAL_ENV']}/bin:{BASE_ENV['PATH']}"

    # The model folder (make demo's, another with --build-arg MODEL_DIR) is what the service
    # loads; a registry is mounted where MAMBA_ASR_MODELS points.
    copies = [shlex.split(ins.args) for ins in instructions if ins.keyword == "COPY"]
    assert ["${MODEL_DIR}", env["MAMBA_ASR_MODEL"]] in copies
    assert Instruction("ARG", "MODEL_DIR=models/demo-ctc") in instructions
    assert env["MAMBA_ASR_MODELS"] == "/models/registry"

    # Every file copied is in the build context: in the repository and not ignored.
    patterns = dockerignore()
    for *sources, _ in copies:
        for source in sources:
            source = expand(source, {"MODEL_DIR": "models/demo-ctc"})
            assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            if source != "models/demo-ctc":  # written by make demo
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    for heavy in (".git", ".venv", "data", "results", "models/registry", "mamba_asr/__pycache__"):
        assert ignored(heavy, patterns), f"{heavy} is sent to the docker daemon"

    # The Python set-up is install.sh's: once before the code is copied (a code change keeps
    # the torch layer), its check once after; the user it makes is the service's.
    runs = [(i, ins.args) for i, ins in enumerate(instructions)
            if ins.keyword == "RUN" and "docker/install.sh" in ins.args]
    assert [shlex.split(run)[:2] for _, run in runs] == [["bash", "docker/install.sh"]] * 2
    (setup_at, setup), (check_at, check) = runs
    first_code = keywords.index("COPY", setup_at)
    assert "--no-check" in setup and "--check-only" in check and setup_at < first_code < check_at
    assert '--venv "${VENV}"' in setup and '--venv "${VENV}"' in check
    assert "$([ \"${CUDA_KERNELS}\" = 1 ] && echo --cuda)" in setup
    assert Instruction("ARG", "CUDA_KERNELS=0") in instructions
    user = last(instructions, "USER").args
    assert user.split(":")[0] not in ("root", "0")
    assert re.search(rf"\bAPP_USER={re.escape(user)}$", INSTALL_SH.read_text(), re.M)
    # Everything after USER runs as that user; installing happened before, as root.
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")

    assert exec_form(last(instructions, "CMD").args)[:2] == ["python", "serve.py"]
    assert last(instructions, "STOPSIGNAL").args == "SIGTERM"
    assert "/ready" in " ".join(healthcheck_argv(instructions))


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_fails_while_not_ready(status, healthy):
    """The HEALTHCHECK command against a server whose /ready answers ``status``."""
    handler = type("Handler", (_ReadyHandler,), {"status": status})
    with http.server.HTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            env = {"PATH": os.environ["PATH"], "MAMBA_ASR_PORT": str(server.server_port)}
            argv = healthcheck_argv(read_instructions(DOCKERFILE))
            assert argv[0] == "python"
            res = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                                 text=True, timeout=30)
        finally:
            server.shutdown()
    assert (res.returncode == 0) == healthy, res.stderr
    if not healthy:
        assert f"HTTP Error {status}" in res.stderr


def reusing_venv(folder: Path) -> Path:
    """A fresh virtual environment of this Python whose site-packages reads this environment's
    (a .pth file), so installing the pinned requirements into it downloads nothing."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(folder)], check=True, capture_output=True)
    site_packages = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    paths = dict.fromkeys(sysconfig.get_path(p) for p in ("purelib", "platlib"))
    # An import line: site.addsitedir also reads the .pth files there (a plain path would not).
    (site_packages / "site-packages" / "reuse-outer-env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in paths))
    return folder


@pytest.mark.slow
def test_install_script_and_cmd_serve_a_model_until_sigterm(tmp_path):
    """docker/install.sh --no-system into a fresh virtual environment (every pin already
    satisfied: PIP_NO_INDEX), then the Dockerfile's CMD with its ENV (host, port and model
    overridden): ready with the model, the HEALTHCHECK passes, SIGTERM ends it with 0."""
    from mamba_asr.export import export_untrained

    venv = reusing_venv(tmp_path / "venv")
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip_env.pop("VIRTUAL_ENV", None)
    res = subprocess.run(["bash", str(INSTALL_SH), "--no-system", "--venv", str(venv)],
                         env=pip_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Successfully installed" not in res.stdout  # nothing was missing
    assert "environment OK" in res.stdout and f"({venv}/bin/python)" in res.stdout

    model = tmp_path / "model"
    card = export_untrained(str(CTC_DEMO), model, name="container-test")

    instructions = read_instructions(DOCKERFILE)
    env = image_env(instructions, {"VENV": str(venv)},
                    {"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    port = free_port()
    env.update(MAMBA_ASR_HOST="127.0.0.1", MAMBA_ASR_PORT=str(port), MAMBA_ASR_MODEL=str(model))
    argv = exec_form(last(instructions, "CMD").args)
    assert shutil.which(argv[0], path=env["PATH"]) == str(venv / "bin" / argv[0])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        # WORKDIR /app holds what the repository root does.
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, ready = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, log.read_text()[-3000:]
        body = ready.json()
        assert body["status"] == "ready"
        assert body["model"].startswith(f"{card['name']}@"), body

        health = subprocess.run(healthcheck_argv(instructions), env=env, capture_output=True,
                                text=True, timeout=30)
        assert health.returncode == 0, health.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
