"""The model a service serves: where ``--model`` points (an export folder, or a registry
reference ``name@alias`` / ``name@version`` / ``name``), loaded and warmed up.

Usage:
    where = locate("demo-ctc@production", Path("models/registry"))   # cheap: no weights read
    model = load(where, device="cpu", max_batch_seconds=60)           # weights, then a warm-up
    model.transcriber.transcribe([(waveform, 16000)])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mamba_asr.model_card import CARD_FILE, CardError, read_card
from mamba_asr.transcriber import Transcriber

WARMUP_SECONDS = (1.0, 2.0)  # one batch of two lengths: every padded-batch code path runs once


@dataclass(frozen=True)
class ModelLocation:
    """Where a model's files are, and what it is called."""

    name: str
    version: str
    path: Path
    requested: str  # the --model value it was resolved from
    aliases: tuple[str, ...] = ()
    in_registry: bool = False  # resolved in the registry (else an export folder)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class ServedModel:
    """A loaded, warmed-up model."""

    where: ModelLocation
    transcriber: Transcriber
    card: dict[str, Any]

    @property
    def name(self) -> str:
        return self.where.name

    @property
    def version(self) -> str:
        return self.where.version

    @property
    def ref(self) -> str:
        return self.where.ref


def folder_version(folder: Path) -> str:
    """The version id the registry gives (or would give) an export folder's content."""
    from mamba_asr.registry import card_digest

    return card_digest((folder / CARD_FILE).read_bytes())[1]


def locate(model: str, models_root: str | Path) -> ModelLocation:
    """Resolve ``--model``: an export folder (a path holding ``model_card.json``) or a reference
    into the registry at ``models_root``. CardError / RegistryError with the reason."""
    path = Path(model)
    if (path / CARD_FILE).is_file():
        card = read_card(path)
        return ModelLocation(str(card.get("name") or path.name), folder_version(path),
                             path.resolve(), model)
    from mamba_asr.registry import Registry, RegistryError

    if path.is_dir() or "/" in model:
        raise CardError(f"--model {model}: not an export folder (no {CARD_FILE}) and not a "
                        "registry reference name[@alias|@version]")
    try:
        found = Registry(models_root).resolve(model)
    except RegistryError as exc:
        raise RegistryError(f"--model {model}: {exc}") from exc
    return ModelLocation(found.name, found.version, Path(found.path), model,
                         tuple(found.aliases), in_registry=True)


def load(where: ModelLocation, device: str = "cpu", **options: Any) -> ServedModel:
    """Load the model at ``where`` (checksums verified) and run a warm-up batch through it."""
    transcriber = Transcriber.from_folder(where.path, device=device, **options)
    rate = transcriber.sample_rate
    generator = torch.Generator().manual_seed(0)
    warmup = [(0.01 * torch.randn(int(s * rate), generator=generator), rate)
              for s in WARMUP_SECONDS]
    list(transcriber.transcribe(warmup))
    return ServedModel(where, transcriber, transcriber.card)
