"""Pretrained LM + tokenizer from local paths only (never downloads), loaded strictly.

Usage:
    from mamba_asr.pretrained import load_pretrained, load_pretrainer, load_lm_folder
    # a folder with lm.ckpt + tokenizer.ckpt (train_LM.py's export folder, or a local copy of
    # SpeechBrain's asr-transformer-transformerlm-librispeech), into objects built from YAML:
    load_pretrained(hparams["lm_model"], hparams["tokenizer"], source="results/LM/export")
    load_pretrained(lm_model, tokenizer, lm_path="/m/lm.ckpt", tokenizer_path="/m/tok.model")
    load_pretrainer(hparams["pretrainer"])      # a Pretrainer declared in YAML, as upstream
    lm, tokenizer, lm_hparams = load_lm_folder("results/LM/demo/2223/export")

    python -m mamba_asr.pretrained results/LM/demo/2223/export   # check a folder loads

Every path is checked before SpeechBrain's Pretrainer sees it: a missing file, or a path that
looks like a HuggingFace hub id (``org/name``) and is not a local folder, fails with a message
saying which file is missing and how to get it. Torch modules load with ``strict=True`` (the
Pretrainer's default hook is non-strict); a checkpoint of another architecture fails with the
architecture it holds next to the one the config declares. The only tolerated difference is a
missing ``positional_encoding.pe``: a buffer computed from d_model, not learned.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from mamba_asr.atomic import atomic_open

logger = logging.getLogger(__name__)

LM_FILE = "lm.ckpt"
TOKENIZER_FILE = "tokenizer.ckpt"
HPARAMS_FILE = "hyperparams.yaml"
EXPORT_MARK = "# Transformer LM exported by train_LM.py"
HUB_MODEL = "speechbrain/asr-transformer-transformerlm-librispeech"
# Deterministic buffers that old checkpoints may lack; rebuilt by the module itself.
REGENERATED_BUFFERS = ("positional_encoding.pe",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)?$")
_EMBEDDING = "custom_src_module.emb.Embedding.weight"
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")

HOW_TO_GET = (
    "Train one with `python train_LM.py hparams/LM/transformer.yaml --data_folder "
    "<LibriSpeech>` (its export folder holds lm.ckpt, tokenizer.ckpt and hyperparams.yaml), or "
    f"copy the folder of SpeechBrain's {HUB_MODEL} from a machine with internet (e.g. "
    f"`huggingface-cli download {HUB_MODEL} lm.ckpt tokenizer.ckpt --local-dir <folder>`) and "
    "set the config's path to that local folder; nothing is downloaded here."
)


class PretrainedError(ValueError):
    """A pretrained file is missing, not local, or does not match the config."""


def check_local_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as an absolute local file, or a PretrainedError saying how to get it."""
    text = os.fspath(path)
    file = Path(text).expanduser()
    if file.is_file():
        return file.resolve()
    if text.startswith(("http://", "https://")):
        raise PretrainedError(
            f"{what} path {text} is a URL; this recipe never downloads. {HOW_TO_GET}"
        )
    folder = file.parent
    hub_like = _HUB_ID.match(text) and not Path(text.split("/")[0]).exists()
    if not folder.is_dir() and hub_like:
        raise PretrainedError(
            f"{what} file {text} not found: {folder} is not a local folder (it looks like a "
            f"HuggingFace hub id, and this recipe never downloads). {HOW_TO_GET}"
        )
    if folder.is_dir():
        present = sorted(p.name for p in folder.iterdir())[:12]
        listing = f"the folder holds: {', '.join(present)}" if present else "the folder is empty"
        raise PretrainedError(
            f"{what} file {file.name} is missing from {folder} ({listing}). {HOW_TO_GET}"
        )
    raise PretrainedError(f"{what} file {file} not found (no folder {folder}). {HOW_TO_GET}")


def resolve_files(
    source: str | os.PathLike | None = None,
    lm_path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    need: tuple[str, ...] = ("lm", "tokenizer"),
) -> dict[str, Path]:
    """Local files for ``need``: explicit paths first, else ``<source>/lm.ckpt`` and
    ``<source>/tokenizer.ckpt``."""
    explicit = {"lm": lm_path, "tokenizer": tokenizer_path}
    default = {"lm": LM_FILE, "tokenizer": TOKENIZER_FILE}
    files = {}
    for name in need:
        path = explicit[name]
        if path is None:
            if source is None:
                raise PretrainedError(
                    f"no {name} path given and no folder to find {default[name]} in"
                )
            path = os.path.join(os.fspath(source), default[name])
        files[name] = check_local_file(path, name)
    return files


def describe_lm(state: Mapping[str, torch.Tensor]) -> str:
    """Architecture of a TransformerLM state_dict in words (vocab, d_model, layers, d_ffn)."""
    emb = state.get(_EMBEDDING)
    if emb is None:
        return f"not a SpeechBrain TransformerLM (no {_EMBEDDING})"
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    ffn = state.get("encoder.layers.0.pos_ffn.ffn.0.weight")
    d_ffn = f", d_ffn {ffn.shape[0]}" if ffn is not None else ""
    return f"vocab {emb.shape[0]}, d_model {emb.shape[1]}, {len(layers)} layers{d_ffn}"


def load_state_dict_strict(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``module`` strictly; a mismatch raises PretrainedError."""
    from speechbrain.utils.checkpoints import torch_patched_state_dict_load

    try:
        state = torch_patched_state_dict_load(path, "cpu")
    except Exception as exc:  # unpickling errors have many types
        raise PretrainedError(f"{path} cannot be read as a torch state_dict: {exc}") from exc
    if not isinstance(state, Mapping):
        raise PretrainedError(f"{path} holds a {type(state).__name__}, not a state_dict")
    own = module.state_dict()
    missing = sorted(set(own) - set(state) - set(REGENERATED_BUFFERS))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        problems = [
            f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}" if shapes else "",
            f"{len(missing)} missing key(s), e.g. {missing[:3]}" if missing else "",
            f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}" if unexpected else "",
        ]
        raise PretrainedError(
            f"{path} does not fit the {type(module).__name__} declared in the config: the "
            f"file holds {describe_lm(state)}, the config builds {describe_lm(own)} "
            f"({'; '.join(p for p in problems if p)}). Set the config's LM architecture to the "
            "checkpoint's, or point it at the checkpoint trained with this architecture; "
            "nothing was loaded."
        )
    _check_exported_config(module, Path(path))
    for key in REGENERATED_BUFFERS:
        if key in own and key not in state:
            logger.info("%s has no %s; keeping the module's own (computed) buffer", path, key)
            state = {**state, key: own[key]}
    module.load_state_dict(state, strict=True)


def lm_config(module: torch.nn.Module) -> dict[str, Any]:
    """What the weights of a TransformerLM cannot tell: heads, activation, norm placement."""
    layers = getattr(getattr(module, "encoder", None), "layers", None)
    if not layers or not hasattr(layers[0], "self_att"):
        return {}
    layer = layers[0]
    return {
        "nhead": layer.self_att.att.num_heads,
        "activation": type(layer.pos_ffn.ffn[1]).__name__,
        "normalize_before": layer.normalize_before,
    }


def _check_exported_config(module: torch.nn.Module, path: Path) -> None:
    """Compare ``module`` with the hyperparams.yaml that train_LM.py wrote beside ``path``."""
    hparams = path.resolve().parent / HPARAMS_FILE
    if not hparams.is_file() or not hparams.read_text().startswith(EXPORT_MARK):
        return
    written = dict(re.findall(r"^(\w+): (.*?)\s*$", hparams.read_text(), flags=re.M))
    found = {k: str(v) for k, v in lm_config(module).items()}
    wanted = {
        "nhead": written.get("nhead"),
        "activation": written.get("activation", "").rsplit(".", 1)[-1],
        "normalize_before": written.get("normalize_before"),
    }
    wrong = [f"{k} {wanted[k]} (config: {v})" for k, v in found.items() if wanted[k] != v]
    if wrong:
        raise PretrainedError(
            f"{path} was trained with {', '.join(wrong)} according to {hparams}: set the "
            "config's LM to the exported architecture; nothing was loaded."
        )


def _load_spm(tokenizer: spm.SentencePieceProcessor, path: str | os.PathLike) -> None:
    try:
        tokenizer.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise PretrainedError(f"{path} is not a SentencePiece model: {exc}") from exc


def lm_vocab(module: torch.nn.Module) -> int | None:
    """Output vocabulary of a TransformerLM-like module (None for other modules)."""
    weight = module.state_dict().get(_EMBEDDING)
    return None if weight is None else int(weight.shape[0])


def _check_vocab(loadables: Mapping[str, Any]) -> None:
    vocabs = {n: lm_vocab(o) for n, o in loadables.items() if isinstance(o, torch.nn.Module)}
    pieces = {
        n: o.get_piece_size()
        for n, o in loadables.items()
        if isinstance(o, spm.SentencePieceProcessor)
    }
    for lm_name, vocab in vocabs.items():
        for tok_name, size in pieces.items():
            if vocab is not None and vocab != size:
                raise PretrainedError(
                    f"the tokenizer '{tok_name}' has {size} pieces but the LM '{lm_name}' has a "
                    f"{vocab}-token vocabulary: they were not trained together"
                )


def load_pretrainer(pretrainer: Any) -> dict[str, Path]:
    """Load a SpeechBrain ``Pretrainer`` (e.g. declared in YAML) from local files only.

    Every path is checked first (see ``check_local_file``); torch modules get the strict hook
    unless a custom hook was given; collection symlinks are refreshed (a stale link in
    ``collect_in`` is never reused) and the network is disabled. Returns the files used.
    """
    from speechbrain.utils.distributed import run_on_main
    from speechbrain.utils.fetching import FetchConfig

    files = {}
    for name, obj in pretrainer.loadables.items():
        if not pretrainer.is_loadable(name):
            continue
        if name not in pretrainer.paths:
            raise PretrainedError(f"the Pretrainer has no path for '{name}'")
        files[name] = check_local_file(str(pretrainer.paths[name]), name)
        pretrainer.paths[name] = str(files[name])
        if name not in pretrainer.custom_hooks:
            if isinstance(obj, torch.nn.Module):
                pretrainer.custom_hooks[name] = load_state_dict_strict
            elif isinstance(obj, spm.SentencePieceProcessor):
                pretrainer.custom_hooks[name] = _load_spm
    config = FetchConfig(allow_network=False, overwrite=True)
    if pretrainer.collect_in is None:
        pretrainer.collect_files(fetch_config=config)  # no links are written: every process
    else:
        run_on_main(pretrainer.collect_files, kwargs={"fetch_config": config})
    pretrainer.load_collected()
    _check_vocab({n: o for n, o in pretrainer.loadables.items() if n in files})
    for name, file in files.items():
        logger.info("loaded pretrained %s from %s", name, file)
    return files


def load_pretrained(
    lm_model: torch.nn.Module | None = None,
    tokenizer: spm.SentencePieceProcessor | None = None,
    source: str | os.PathLike | None = None,
    lm_path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    collect_in: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Load ``lm_model`` and/or ``tokenizer`` from a folder (``source``) or explicit paths."""
    from speechbrain.utils.parameter_transfer import Pretrainer

    loadables = {k: v for k, v in (("lm", lm_model), ("tokenizer", tokenizer)) if v is not None}
    if not loadables:
        raise PretrainedError("nothing to load: give lm_model and/or tokenizer")
    files = resolve_files(source, lm_path, tokenizer_path, need=tuple(loadables))
    pretrainer = Pretrainer(
        collect_in=collect_in, loadables=loadables, paths={k: str(v) for k, v in files.items()}
    )
    return load_pretrainer(pretrainer)


# --------------------------------------------------------------------------- LM folders


def _yaml_value(value: Any) -> str:
    if isinstance(value, type):
        short = getattr(torch.nn, value.__name__, None) is value  # torch.nn.GELU, not ...activation
        return f"!name:{'torch.nn' if short else value.__module__}.{value.__qualname__}"
    if isinstance(value, bool) or value is None:
        return {True: "True", False: "False", None: "null"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_lm_folder(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: spm.SentencePieceProcessor,
    arch: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    bos_index: int = 1,
    eos_index: int = 2,
) -> Path:
    """Write ``lm.ckpt`` (state_dict), ``tokenizer.ckpt`` and ``hyperparams.yaml`` (the
    architecture ``arch``: TransformerLM keyword arguments) to ``folder``, each atomically,
    then check that the folder loads back strictly into an equal model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if lm_vocab(model) not in (None, tokenizer.get_piece_size()):
        raise PretrainedError(
            f"LM vocabulary {lm_vocab(model)} != tokenizer size {tokenizer.get_piece_size()}"
        )
    with atomic_open(folder / LM_FILE, "wb") as f:
        torch.save(state, f)
    with atomic_open(folder / TOKENIZER_FILE, "wb") as f:
        f.write(tokenizer.serialized_model_proto())
    args = "\n".join(f"    {k}: !ref <{k}>" for k in arch)
    lines = [
        f"{EXPORT_MARK} on {datetime.date.today()}.",
        f"# {LM_FILE}: TransformerLM state_dict; {TOKENIZER_FILE}: SentencePiece model.",
        "# Load: from mamba_asr.pretrained import load_lm_folder; "
        "lm, tok, hp = load_lm_folder('<folder>')",
        "# or point an S2S config's pretrained path at this folder.",
        "",
        *[f"{k}: {_yaml_value(v)}" for k, v in arch.items()],
        f"bos_index: {bos_index}",
        f"eos_index: {eos_index}",
        *[f"{k}: {_yaml_value(v)}" for k, v in (info or {}).items()],
        "",
        "pretrained_path: !PLACEHOLDER  # this folder",
        "",
        f"lm_model: !new:{type(model).__module__}.{type(model).__qualname__}",
        args,
        "",
        "tokenizer: !new:sentencepiece.SentencePieceProcessor",
        "",
        "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer",
        "    loadables:",
        "        lm: !ref <lm_model>",
        "        tokenizer: !ref <tokenizer>",
        "    paths:",
        f"        lm: !ref <pretrained_path>/{LM_FILE}",
        f"        tokenizer: !ref <pretrained_path>/{TOKENIZER_FILE}",
        "",
    ]
    with atomic_open(folder / HPARAMS_FILE, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    rebuilt, _, _ = load_lm_folder(folder)
    if not _same_outputs(model, rebuilt, tokenizer.bos_id()):
        raise PretrainedError(
            f"{folder / HPARAMS_FILE} does not rebuild the trained LM (outputs differ): the "
            "architecture keys given to the export do not describe the model"
        )
    return folder


@torch.no_grad()
def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, bos: int) -> bool:
    vocab = lm_vocab(a) or 2
    tokens = torch.cat(
        [
            torch.full((2, 1), bos),
            torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(0)),
        ],
        dim=1,
    )
    was_training = a.training
    a.eval()
    b.eval()
    device = next(a.parameters()).device
    out_a = a(tokens.to(device)).cpu()
    out_b = b(tokens)
    a.train(was_training)
    return torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5)


def load_lm_folder(
    folder: str | os.PathLike, device: str = "cpu"
) -> tuple[torch.nn.Module, spm.SentencePieceProcessor, dict[str, Any]]:
    """Build the LM of an export folder's ``hyperparams.yaml`` (written by ``write_lm_folder``)
    and load ``lm.ckpt`` + ``tokenizer.ckpt`` into it strictly. Returns (lm in eval mode,
    tokenizer, hparams). For other folders build the LM from YAML and use load_pretrained."""
    from hyperpyyaml import load_hyperpyyaml

    folder = Path(folder)
    files = resolve_files(folder)
    hparams_file = check_local_file(folder / HPARAMS_FILE, "hyperparams")
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"pretrained_path": str(folder.resolve())})
    for key in ("lm_model", "tokenizer"):
        if key not in hparams:
            raise PretrainedError(f"{hparams_file} declares no {key!r}")
    load_pretrained(
        hparams["lm_model"],
        hparams["tokenizer"],
        lm_path=files["lm"],
        tokenizer_path=files["tokenizer"],
    )
    lm = hparams["lm_model"].to(device).eval()
    return lm, hparams["tokenizer"], hparams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check that an LM folder loads (local files only).")
    p.add_argument("folder", help="folder with lm.ckpt, tokenizer.ckpt and hyperparams.yaml")
    p.add_argument("--text", default="THE CAT SAT ON THE MAT", help="sentence to score")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        lm, tokenizer, _ = load_lm_folder(args.folder)
    except PretrainedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ids = tokenizer.encode_as_ids(args.text)
    inp = torch.tensor([[tokenizer.bos_id(), *ids]])
    tgt = torch.tensor([[*ids, tokenizer.eos_id()]])
    with torch.no_grad():
        logp = torch.log_softmax(lm(inp), dim=-1).gather(-1, tgt.unsqueeze(-1))
    n_params = sum(p.numel() for p in lm.parameters())
    print(f"{args.folder}: {n_params:,} parameters, {tokenizer.get_piece_size()} pieces")
    print(f"{args.text!r}: {len(ids) + 1} tokens, perplexity {float((-logp.mean()).exp()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
