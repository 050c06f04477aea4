"""The inference-only ``hyperparams.yaml`` of an exported model, written from a training
configuration so that SpeechBrain's own ``EncoderASR`` (CTC) and ``EncoderDecoderASR`` (S2S)
load the folder.

The model's definitions (features, normaliser, CNN front-end, encoder/decoder, output layers,
search, LM) are copied from the training run's resolved configuration, nothing else (no data
paths, optimiser, augmentation or schedules); SpeechBrain's glue is added around them:
``encoder`` (a ``LengthsCapableSequential``: features -> normaliser -> CNN -> encoder
[-> CTC log-probabilities]), ``decoding_function`` (CTC) or ``decoder`` (the S2S beam search
with its CTC and LM scorers), ``tokenizer``, ``modules`` and a ``Pretrainer`` whose loadables
(``asr``, ``normalizer``, ``tokenizer``, ``lm``) name the folder's ``<key>.ckpt`` files.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ruamel.yaml
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.scalarstring import ScalarString

INDENT = "    "
WINDOWED_NORM = "!new:modules.normalization.WindowedInputNormalization"
ENCODER_WRAPPER = "!new:speechbrain.lobes.models.transformer.TransformerASR.EncoderWrapper"


def load_resolved(text: str) -> CommentedMap:
    """A resolved HyperPyYAML text (references replaced, tags kept) as a round-trip tree."""
    yaml = ruamel.yaml.YAML(typ="rt")
    yaml.preserve_quotes = True
    return yaml.load(text)


def _tag(node: Any) -> str | None:
    tag = getattr(node, "tag", None)
    value = getattr(tag, "value", None) if tag is not None else None
    return value if isinstance(value, str) and value.startswith("!") else None


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ScalarString):  # quoted in the source: keep it a string
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) else repr(float(value))
    return str(value)  # a plain scalar stays plain: "(3, 3)" is HyperPyYAML's tuple


class Emitter:
    """Writes tagged YAML nodes as HyperPyYAML text; a node that is one of ``refs`` (by
    identity) is written as ``!ref <name>``, so that shared objects stay shared."""

    def __init__(self, refs: dict[int, str]) -> None:
        self.refs = refs

    def inline(self, node: Any) -> str | None:
        """The node on one line, or None when it needs a block."""
        if id(node) in self.refs:
            return f"!ref <{self.refs[id(node)]}>"
        if isinstance(node, TaggedScalar):
            return f"{node.tag.value} {node.value}".rstrip()
        if isinstance(node, CommentedMap | dict):
            return (_tag(node) or "{}") if not node else None
        if isinstance(node, CommentedSeq | list):
            items = [self.inline(item) for item in node]
            if _tag(node) is None and all(i is not None and "\n" not in i for i in items):
                return "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
            return None
        return _scalar(node)

    def value(self, node: Any, depth: int) -> str:
        """The text after ``key:`` for ``node`` at indentation ``depth``."""
        one = self.inline(node)
        if one is not None:
            return " " + one
        pad = INDENT * (depth + 1)
        tag = _tag(node)
        head = f" {tag}" if tag else ""
        if isinstance(node, CommentedMap | dict):
            body = "".join(f"\n{pad}{k}:{self.value(v, depth + 1)}" for k, v in node.items())
            return head + body
        items = []
        for item in node:
            text = self.value(item, depth + 1)
            items.append(f"\n{pad}-{text}" if not text.startswith("\n") else f"\n{pad}-"
                         + text.replace("\n" + INDENT * (depth + 2), "\n" + pad + "  ", 1))
        return head + "".join(items)

    def entry(self, key: str, node: Any, tag: str | None = None) -> str:
        """``key: <node>`` as a top-level entry (``tag`` replaces the node's own tag)."""
        if tag is not None:
            body = self.value(CommentedMap(node), 0) if node else ""
            return f"{key}: {tag}{body}\n"
        return f"{key}:{self.value(node, 0)}\n"


def _obj(tag: str, **kwargs: str) -> str:
    """``tag`` with ``key: text`` lines (texts already YAML, e.g. ``!ref <x>``)."""
    return tag + "".join(f"\n{INDENT}{k}: {v}" for k, v in kwargs.items())


def _refs(names: Iterable[str]) -> str:
    return "[" + ", ".join(f"!ref <{n}>" for n in names) + "]"


def _model_entries(config: CommentedMap, keys: list[str], refs: dict[int, str],
                   norm_window_frames: int | None) -> list[str]:
    """``key: definition`` of each of ``keys``, other keys' objects inside as references; a
    windowed normaliser when ``norm_window_frames`` is given."""
    out = []
    for key in keys:
        emitter = Emitter({i: n for i, n in refs.items() if n != key})
        if key == "normalize" and norm_window_frames is not None:
            args = CommentedMap(config[key])
            args["window_frames"] = norm_window_frames
            out.append(emitter.entry(key, args, WINDOWED_NORM))
        else:
            out.append(emitter.entry(key, config[key]))
    return out


def _encoder(*tail: str) -> str:
    """SpeechBrain's ``encoder``: features -> normaliser -> CNN -> encoder, then ``tail``."""
    return "encoder: " + _obj(
        "!new:speechbrain.nnet.containers.LengthsCapableSequential",
        input_shape="[null, null]", compute_features="!ref <compute_features>",
        normalize="!ref <normalize>", CNN="!ref <CNN>",
        transformer_encoder=_obj(ENCODER_WRAPPER, transformer="!ref <Transformer>")
        .replace("\n", "\n" + INDENT),
        **{key: f"!ref <{key}>" for key in tail},
    ) + "\n"


def uses_sentence_norm(config: CommentedMap) -> bool:
    """Whether the configuration normalises features per utterance (``norm_type: sentence``)."""
    node = config.get("normalize")
    return isinstance(node, dict) and node.get("norm_type", "global") == "sentence"


def ctc_hparams(
    config: CommentedMap, header: str, info: dict[str, Any], norm_window_frames: int | None
) -> str:
    """The inference YAML of a CTC model (SpeechBrain ``EncoderASR``)."""
    keys = ["compute_features", "normalize", "CNN", "Transformer", "ctc_lin", "log_softmax",
            "model"]
    refs = {id(config[k]): k for k in keys}
    parts = [header, _info(info), "# Model (from the training configuration)\n"]
    parts += _model_entries(config, keys, refs, norm_window_frames)
    beam = dict(config["ctc_beam_search"])
    greedy = config["test_search"] != "beam"
    parts += [
        "\n# SpeechBrain EncoderASR: encoder (waveform -> CTC log-probabilities), decoding\n",
        _encoder("ctc_lin", "log_softmax"),
        "# CTC prefix beam search options (transcribe.py --search beam)\n",
        Emitter({}).entry("ctc_beam_search", CommentedMap(beam)),
    ]
    if greedy:
        parts.append(
            "decoding_function: " + _obj(
                "!name:speechbrain.decoders.ctc_greedy_decode",
                blank_id=_scalar(config["blank_index"]),
            ) + "\n"
        )
    else:
        parts += [
            "decoding_function: !name:speechbrain.decoders.ctc.CTCPrefixBeamSearcher\n",
            "test_beam_search: !ref <ctc_beam_search>\n",
        ]
    parts += [
        "tokenizer: !new:speechbrain.dataio.encoder.CTCTextEncoder\n",
        "modules:\n" + INDENT + "encoder: !ref <encoder>\n",
        _pretrainer({"asr": "model", "normalizer": "normalize", "tokenizer": "tokenizer"}),
    ]
    return "".join(parts)


def s2s_hparams(
    config: CommentedMap,
    header: str,
    info: dict[str, Any],
    norm_window_frames: int | None,
    with_lm: bool,
) -> str:
    """The inference YAML of an S2S model (SpeechBrain ``EncoderDecoderASR``): the test beam
    search with the CTC scorer and, ``with_lm``, the LM scorer, as the recipe's test stage;
    ``decoder_no_lm`` is the same search without the LM."""
    keys = ["compute_features", "normalize", "CNN", "Transformer", "seq_lin", "ctc_lin",
            "log_softmax", "model", "ctc_scorer"]
    refs = {id(config[k]): k for k in keys}
    parts = [header, _info(info), "# Model (from the training configuration)\n"]
    parts += _model_entries(config, keys, refs, norm_window_frames)
    emitter = Emitter(refs)
    ctc_weight = float(config["ctc_weight_decode"])
    scorers, weights = [], {}
    if ctc_weight > 0:
        scorers.append("ctc_scorer")
        weights["ctc"] = ctc_weight
    if with_lm:
        parts += [
            "\n# Language model (lm.ckpt) fused by the test search\n",
            emitter.entry("lm_model", config["lm_model"], "!new:" + _name(config["lm_model"])),
        ]
        lm_args = CommentedMap(config["lm_scorer"])
        parts.append(emitter.entry(
            "lm_scorer", lm_args, "!new:" + _name(config["lm_scorer"])
        ).rstrip("\n") + f"\n{INDENT}language_model: !ref <lm_model>\n")
    search = config["test_search"]
    search_args = CommentedMap((k, v) for k, v in search.items() if k != "modules")
    search_tag = "!new:" + _name(search)

    def decoder(key: str, names: list[str], ws: dict[str, float]) -> list[str]:
        scorer_key = "scorer" if key == "decoder" else "scorer_no_lm"
        out = []
        if names:
            weight_text = "{" + ", ".join(f"{k}: {v!r}" for k, v in ws.items()) + "}"
            out.append(f"{scorer_key}: " + _obj(
                "!new:speechbrain.decoders.scorer.ScorerBuilder",
                full_scorers=_refs(names), weights=weight_text,
            ) + "\n")
        text = Emitter({}).entry(key, search_args, search_tag).rstrip("\n")
        text += f"\n{INDENT}modules: {_refs(['Transformer', 'seq_lin'])}"
        text += f"\n{INDENT}scorer: " + (f"!ref <{scorer_key}>" if names else "null") + "\n"
        return out + [text]

    parts.append("\n# SpeechBrain EncoderDecoderASR: encoder and the test beam search\n")
    parts.append(_encoder())
    names = [*scorers, *(["lm_scorer"] if with_lm else [])]
    all_weights = {**weights, **({"transformerlm": float(config["lm_weight"])} if with_lm else {})}
    parts += decoder("decoder", names, all_weights)
    if with_lm:
        parts.append("# The same search without the LM (transcribe.py --no_lm)\n")
        parts += decoder("decoder_no_lm", scorers, weights)
    modules = {"encoder": "encoder", "decoder": "decoder"}
    loadables = {"asr": "model", "normalizer": "normalize", "tokenizer": "tokenizer"}
    if with_lm:
        modules["lm_model"] = "lm_model"
        loadables["lm"] = "lm_model"
    parts += [
        "tokenizer: !new:sentencepiece.SentencePieceProcessor\n",
        "modules:\n" + "".join(f"{INDENT}{k}: !ref <{v}>\n" for k, v in modules.items()),
        _pretrainer(loadables),
    ]
    return "".join(parts)


def _name(node: Any) -> str:
    """The class of a ``!new:``/``!name:`` node."""
    tag = _tag(node) or ""
    return tag.split(":", 1)[1]


def _info(info: dict[str, Any]) -> str:
    emitter = Emitter({})
    return "".join(emitter.entry(k, v) for k, v in info.items()) + "\n"


def _pretrainer(loadables: dict[str, str]) -> str:
    """A Pretrainer loading ``<key>.ckpt`` of the folder into each loadable."""
    body = "".join(f"\n{INDENT * 2}{k}: !ref <{v}>" for k, v in loadables.items())
    return (
        "\n# Loads <key>.ckpt from the folder (from_hparams(source=folder, savedir=folder))\n"
        "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n"
        f"{INDENT}loadables:{body}\n"
    )
