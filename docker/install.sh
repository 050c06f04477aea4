#!/usr/bin/env bash
# The Python set-up of the service image, in one script the Dockerfile runs and the tests run
# without Docker (tests/test_docker.py: --no-system into a fresh virtual environment).
#
#   1. OS step (root; skipped with --no-system): the Debian/Ubuntu packages the image needs
#      (CA certificates; the distribution's Python 3 where the base image has no Python, as
#      the CUDA images; a compiler and Python headers for the optional CUDA kernels) and the
#      non-root user the service runs as.
#   2. A virtual environment (created when missing) with the pinned requirements.txt, and with
#      --cuda the optional Mamba kernels of requirements-cuda.txt (built against the torch just
#      installed, hence --no-build-isolation). pip reads PIP_INDEX_URL, PIP_NO_INDEX,
#      PIP_FIND_LINKS... from the environment: with PIP_NO_INDEX=1 it downloads nothing and
#      fails unless every pin is already satisfied.
#   3. A check that the service's imports resolve and that the installed versions match the
#      pins (python -m mamba_asr.check_env); it needs the code, so --no-check skips it where
#      only the requirements are copied yet and --check-only runs it alone.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=/opt/venv
PYTHON=
APP_USER=app
APP_UID=1000
SYSTEM=1
INSTALL=1
CHECK=1
CUDA=0

usage() {
    cat <<EOF
usage: docker/install.sh [--no-system] [--venv DIR] [--python PY] [--cuda]
                         [--user NAME] [--uid UID] [--no-check | --check-only]

  --no-system   skip the OS step (apt-get, useradd): no root needed
  --venv DIR    the virtual environment to install into, created when missing ($VENV)
  --python PY   the interpreter that creates it (default: python3.11, else python3)
  --cuda        also build the optional CUDA kernels (requirements-cuda.txt; needs nvcc)
  --user NAME   the service's non-root user, made by the OS step ($APP_USER)
  --uid UID     its user id, e.g. the owner of a mounted registry ($APP_UID)
  --no-check    install only; the import and version check needs the code beside this script
  --check-only  only the check, in an existing --venv
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while (($#)); do
    case $1 in
        --no-system) SYSTEM=0 ;;
        --venv) need_value "$@"; VENV=$2; shift ;;
        --python) need_value "$@"; PYTHON=$2; shift ;;
        --cuda) CUDA=1 ;;
        --user) need_value "$@"; APP_USER=$2; shift ;;
        --uid)
            need_value "$@"
            [[ $2 =~ ^[0-9]+$ ]] || die "--uid '$2': expected a number"
            APP_UID=$2; shift ;;
        --no-check) CHECK=0 ;;
        --check-only) SYSTEM=0; INSTALL=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
((INSTALL || CHECK)) || die "--no-check and --check-only together leave nothing to do"

system_step() {
    [[ $EUID -eq 0 ]] || die "the OS step (apt-get, useradd) needs root; --no-system skips it"
    command -v apt-get >/dev/null || die "the OS step needs apt-get (a Debian or Ubuntu base)"
    local packages=(ca-certificates)
    if [[ -z $PYTHON ]] && ! command -v python3.11 >/dev/null && ! command -v python3 >/dev/null
    then
        packages+=(python3 python3-venv)
    fi
    if ((CUDA)); then
        packages+=(build-essential python3-dev git)
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${packages[@]}"
    rm -rf /var/lib/apt/lists/*
    if ! id -u "$APP_USER" >/dev/null 2>&1; then
        useradd --create-home --uid "$APP_UID" --user-group --shell /usr/sbin/nologin "$APP_USER"
    fi
}

install_step() {
    if [[ ! -x $VENV/bin/python ]]; then
        if [[ -z $PYTHON ]]; then
            PYTHON=$(command -v python3.11 || command -v python3) \
                || die "no python3.11 or python3 on PATH: pass --python"
        fi
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -r "$REPO/requirements.txt"
    if ((CUDA)); then
        # The kernels' setup.py imports torch and packaging and compiles with ninja.
        "$VENV/bin/python" -m pip install setuptools wheel packaging ninja
        "$VENV/bin/python" -m pip install --no-build-isolation -r "$REPO/requirements-cuda.txt"
    fi
}

check_step() {
    [[ -x $VENV/bin/python ]] || die "$VENV is not a virtual environment (no bin/python)"
    [[ -f $REPO/serve.py ]] || die "$REPO/serve.py not found: the check needs the code"
    cd "$REPO"
    # The service's imports (FastAPI, uvicorn, SpeechBrain, torch...), then the pinned versions.
    "$VENV/bin/python" -c 'import sys; import serve; from mamba_asr import check_env
sys.exit(check_env.main([]))'
}

if ((SYSTEM)); then system_step; fi
if ((INSTALL)); then install_step; fi
if ((CHECK)); then check_step; fi
