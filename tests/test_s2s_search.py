"""The NumPy S2S beam search (mamba_asr.ort.s2s_search) finds SpeechBrain's hypotheses: the
demo's Mamba decoder (random weights, shrunk) searched by ``S2SMambaBeamSearcher`` with its CTC
and Transformer-LM scorers, and by ``beam_search`` through torch-backed step decoders."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from runs import REPO, load_s2s_demo
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder, TransformerLMScorer

from mamba_asr.ort.s2s_search import SearchOptions, beam_search
from modules.beam_search import S2SMambaBeamSearcher

# SpeechBrain's TransformerLM passes masks of mixed types to torch's attention
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

LENGTHS = [31, 24, 13]  # encoder frames of a padded batch
SHRUNK = {"num_encoder_layers": 1, "num_decoder_layers": 2, "d_ffn": 128, "lm_num_layers": 1,
          "lm_d_ffn": 128}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Single-threaded torch: on a shared 2-core machine, threads of tiny matrix products
    wait on each other (20 s instead of 0.6 s for one search)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo's decoder, output layers and LM with random weights, a padded batch of
    encoder outputs and its CTC log-probabilities."""
    tmp = tmp_path_factory.mktemp("s2s_search")
    hparams = load_s2s_demo(data_folder=str(tmp), output_folder=str(tmp), **SHRUNK)
    torch.manual_seed(3)
    lm = hparams["lm_model"]().eval()
    lengths = torch.tensor(LENGTHS)
    enc = 3 * torch.randn(len(LENGTHS), max(LENGTHS), hparams["d_model"])
    enc[torch.arange(enc.shape[1])[None, :] >= lengths[:, None]] = 0
    with torch.no_grad():
        # sharper than random weights give: varied, not near-uniform, choices
        hparams["seq_lin"].w.weight.mul_(4)
        hparams["ctc_lin"].w.weight.mul_(4)
        ctc_log_probs = torch.log_softmax(hparams["ctc_lin"](enc), dim=-1)
    return {**hparams, "lm": lm, "enc": enc, "lengths": lengths, "ctc": ctc_log_probs}


class MambaStep:
    """The Mamba decoder as a StepDecoder: state (decoder state); the prefix's last token at
    its position."""

    def __init__(self, demo: dict) -> None:
        self.net, self.seq_lin = demo["Transformer"], demo["seq_lin"]

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray):
        return self.net.init_decoder_state(torch.from_numpy(encoder_out),
                                           torch.from_numpy(encoder_lengths))

    def step(self, prefix: np.ndarray, state):
        tokens = torch.from_numpy(prefix[:, -1])
        with torch.no_grad():
            out, state = self.net.decode_step(tokens, prefix.shape[1] - 1, state)
            return self.seq_lin(out)[:, -1].numpy(), state

    def reorder(self, state, index: np.ndarray):
        return self.net.reorder_decoder_state(state, torch.from_numpy(index))


class LMStep:
    """The Transformer LM as a StepDecoder: no state; the whole prefix each step."""

    def __init__(self, lm: torch.nn.Module) -> None:
        self.lm = lm

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray) -> None:
        return None

    def step(self, prefix: np.ndarray, state: None) -> tuple[np.ndarray, None]:
        with torch.no_grad():
            return self.lm(torch.from_numpy(prefix))[:, -1].numpy(), None

    def reorder(self, state: None, index: np.ndarray) -> None:
        return None


def speechbrain_search(demo: dict, options: SearchOptions, with_lm: bool) -> list[list[int]]:
    """SpeechBrain's hypotheses, the searcher built as train_S2S.build_searcher builds it."""
    scorers, weights = [], {}
    if options.ctc_weight > 0:
        scorers.append(CTCScorer(ctc_fc=demo["ctc_lin"], blank_index=options.blank_id,
                                 eos_index=options.eos_id))
        weights["ctc"] = options.ctc_weight
    if with_lm:
        scorers.append(TransformerLMScorer(demo["lm"], temperature=options.lm_temperature))
        weights["transformerlm"] = options.lm_weight
    searcher = S2SMambaBeamSearcher(
        modules=[demo["Transformer"], demo["seq_lin"]], bos_index=options.bos_id,
        eos_index=options.eos_id, min_decode_ratio=options.min_decode_ratio,
        max_decode_ratio=options.max_decode_ratio, beam_size=options.beam_size,
        temperature=options.temperature, using_eos_threshold=options.using_eos_threshold,
        eos_threshold=options.eos_threshold, length_normalization=options.length_normalization,
        scorer=ScorerBuilder(full_scorers=scorers, weights=weights) if scorers else None,
    )
    enc = demo["enc"]
    with torch.no_grad():
        hyps, _, _, _ = searcher(enc.clone(), demo["lengths"] / enc.shape[1])
    return hyps


def numpy_search(demo: dict, options: SearchOptions, with_lm: bool) -> list[list[int]]:
    lm = LMStep(demo["lm"]) if with_lm else None
    return beam_search(MambaStep(demo), demo["enc"].numpy(), demo["lengths"].numpy(),
                       demo["ctc"].numpy(), options, lm=lm)


def demo_options(demo: dict, **changes: object) -> SearchOptions:
    """The demo's test search (hparams/S2S/demo.yaml) with ``changes``."""
    metadata = {
        "bos_id": demo["bos_index"], "eos_id": demo["eos_index"],
        "blank_id": demo["blank_index"], "beam_size": 4,
        "ctc_weight": demo["ctc_weight_decode"], "lm_weight": demo["lm_weight"],
        "temperature": demo["test_temperature"], "lm_temperature": demo["lm_temperature"],
        "min_decode_ratio": demo["min_decode_ratio"], "max_decode_ratio": 1.0,
        "length_normalization": "1", "using_eos_threshold": "0", "has_lm": "1",
    }
    options = SearchOptions.from_metadata({k: str(v) for k, v in metadata.items()})
    return replace(options, **changes)


CASES = {
    # name: (option changes, with LM); the demo's test search is beam 4 (10 there), CTC 0.4,
    # temperature 1.15, length normalisation, no eos threshold
    "beam4": ({}, False),
    "beam1": ({"beam_size": 1}, False),
    "beam6_ctc0": ({"beam_size": 6, "ctc_weight": 0.0}, False),
    "ctc1": ({"ctc_weight": 1.0}, False),
    "no_length_norm": ({"length_normalization": False}, False),
    "short_max_ratio": ({"max_decode_ratio": 0.2}, False),
    "short_max_ratio_no_norm": ({"max_decode_ratio": 0.2, "length_normalization": False}, False),
    "eos_threshold": ({"using_eos_threshold": True, "min_decode_ratio": 0.1}, False),
    "lm": ({"lm_weight": 0.5}, True),
    "lm_ctc0_beam1": ({"lm_weight": 0.5, "ctc_weight": 0.0, "beam_size": 1}, True),
    "lm_ctc1_no_norm": ({"lm_weight": 0.3, "ctc_weight": 1.0, "length_normalization": False},
                        True),
}


@pytest.fixture(scope="module")
def expected(demo: dict) -> dict[str, list[list[int]]]:
    """SpeechBrain's hypotheses of every case."""
    return {case: speechbrain_search(demo, demo_options(demo, **changes), with_lm)
            for case, (changes, with_lm) in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_same_hypotheses_as_speechbrain(demo: dict, expected: dict, case: str) -> None:
    changes, with_lm = CASES[case]
    assert numpy_search(demo, demo_options(demo, **changes), with_lm) == expected[case]


def test_the_cases_search_differently(expected: dict) -> None:
    """Every rule changes the demo's result, and hypotheses both end (shorter than the step
    limit) and are cut by it, so the comparisons above cover them."""
    base = expected["beam4"]
    for case in ("beam1", "beam6_ctc0", "ctc1", "no_length_norm", "eos_threshold", "lm"):
        assert expected[case] != base, case
    assert expected["lm_ctc0_beam1"] != expected["beam6_ctc0"]
    assert expected["lm_ctc1_no_norm"] != expected["ctc1"]
    limit = max(LENGTHS) - 1  # int(T * 1.0) steps, the last token dropped
    assert len(base[0]) == limit and all(len(h) < limit for h in base[1:])
    short = int(max(LENGTHS) * 0.2) - 1
    assert [len(h) for h in expected["short_max_ratio"]] == [short] * len(LENGTHS)


def test_options_from_metadata() -> None:
    options = SearchOptions.from_metadata({
        "bos_id": "1", "eos_id": "2", "blank_id": "0", "beam_size": "10", "ctc_weight": "0.4",
        "length_normalization": "0", "decoder_type": "transformer", "model_type": "x",
    })
    assert (options.beam_size, options.ctc_weight, options.length_normalization,
            options.decoder_type, options.eos_threshold) == (10, 0.4, False, "transformer", 1.5)
    with pytest.raises(ValueError, match="beam_size"):
        SearchOptions.from_metadata({"bos_id": "1", "eos_id": "2", "blank_id": "0"})
    with pytest.raises(ValueError, match="length_normalization='yes'"):
        SearchOptions.from_metadata({"bos_id": "1", "eos_id": "2", "blank_id": "0",
                                     "beam_size": "4", "length_normalization": "yes"})
    with pytest.raises(ValueError, match="distinct"):
        SearchOptions.from_metadata({"bos_id": "1", "eos_id": "2", "blank_id": "2",
                                     "beam_size": "4", "ctc_weight": "0.3"})


def test_imports_without_torch() -> None:
    code = ("import sys; import mamba_asr.ort.s2s_search; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'speechbrain', 'torchaudio', 'modules')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
