# The transcription service (serve.py) on the CPU, with one exported model:
#   make demo && docker build -t mamba-asr .
#   docker run --rm -p 8000:8000 --stop-timeout 40 mamba-asr
# CUDA variant with the optional Mamba kernels (docs/serving.md, "Containers"):
#   docker build -t mamba-asr:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#     --build-arg CUDA_KERNELS=1 --build-arg DEVICE=cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# 1 builds requirements-cuda.txt's kernels (needs a CUDA devel base).
ARG CUDA_KERNELS=0
# The service's default device: cpu or cuda.
ARG DEVICE=cpu
# The export folder copied into the image (make demo writes models/demo-ctc).
ARG MODEL_DIR=models/demo-ctc
# The service user's id: the owner's id of a mounted registry, whose files it reads.
ARG APP_UID=1000
ARG VENV=/opt/venv

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=${VENV} \
    PATH=${VENV}/bin:${PATH}

WORKDIR /app

# The Python set-up first, on its own layer: a code change does not reinstall torch.
COPY requirements.txt requirements-cuda.txt ./
COPY docker/install.sh docker/
RUN bash docker/install.sh --venv "${VENV}" --uid "${APP_UID}" --no-check \
        $([ "${CUDA_KERNELS}" = 1 ] && echo --cuda)

COPY mamba_asr/ mamba_asr/
COPY modules/ modules/
COPY hparams/ hparams/
COPY serve.py export.py transcribe.py evaluate.py pyproject.toml ./
RUN bash docker/install.sh --venv "${VENV}" --check-only

COPY ${MODEL_DIR} /models/model

# The service's settings (serve.py reads every MAMBA_ASR_* default from the environment):
# the copied model; a registry mounted on /models/registry is picked with
# -e MAMBA_ASR_MODEL=name@alias.
ENV MAMBA_ASR_HOST=0.0.0.0 \
    MAMBA_ASR_PORT=8000 \
    MAMBA_ASR_MODEL=/models/model \
    MAMBA_ASR_MODELS=/models/registry \
    MAMBA_ASR_DEVICE=${DEVICE}
EXPOSE 8000

USER app

# Healthy once the model is loaded and warmed up; unhealthy while draining. Slim images have
# no curl: Python's urllib raises on any status but 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['MAMBA_ASR_PORT'] + '/ready', timeout=4)"]

# SIGTERM: the service stops taking requests, drains (--drain_seconds, 30 s by default) and
# exits 0; docker stop sends SIGKILL after 10 s unless given --stop-timeout / -t.
STOPSIGNAL SIGTERM
CMD ["python", "serve.py"]
