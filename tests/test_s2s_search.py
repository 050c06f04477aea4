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
from speechbrain.decoders.ctc import CTCPrefixScore
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder, TransformerLMScorer
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher

from mamba_asr.ort.s2s_search import CTCPrefixScorer, SearchOptions, beam_search
from modules.beam_search import S2SMambaBeamSearcher
from modules.TransformerASR import TransformerASR

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
    """The demo's decoder, output layers and LM with random weights, a padded batch of random
    encoder outputs (the search needs no encoder) and its CTC log-probabilities."""
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


class TransformerStep:
    """A Transformer decoder as a StepDecoder: state (encoder output, lengths); the whole
    prefix each step."""

    def __init__(self, net: TransformerASR, seq_lin: torch.nn.Module) -> None:
        self.net, self.seq_lin = net, seq_lin

    def init(self, encoder_out: np.ndarray, encoder_lengths: np.ndarray):
        return torch.from_numpy(encoder_out), torch.from_numpy(encoder_lengths)

    def step(self, prefix: np.ndarray, state):
        with torch.no_grad():
            out, _ = self.net.decode(torch.from_numpy(prefix), *state)
            return self.seq_lin(out)[:, -1].numpy(), state

    def reorder(self, state, index: np.ndarray):
        return tuple(x[torch.from_numpy(index)] for x in state)


def speechbrain_search(demo: dict, options: SearchOptions, with_lm: bool,
                       searcher_class: type = S2SMambaBeamSearcher,
                       net: torch.nn.Module | None = None) -> list[list[int]]:
    """SpeechBrain's hypotheses, the searcher built as train_S2S.build_searcher builds it."""
    scorers, weights = [], {}
    if options.ctc_weight > 0:
        scorers.append(CTCScorer(ctc_fc=demo["ctc_lin"], blank_index=options.blank_id,
                                 eos_index=options.eos_id))
        weights["ctc"] = options.ctc_weight
    if with_lm:
        scorers.append(TransformerLMScorer(demo["lm"], temperature=options.lm_temperature))
        weights["transformerlm"] = options.lm_weight
    searcher = searcher_class(
        modules=[net or demo["Transformer"], demo["seq_lin"]], bos_index=options.bos_id,
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
    "min_ratio_ctc0": ({"beam_size": 6, "ctc_weight": 0.0, "min_decode_ratio": 0.5}, False),
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
    assert expected["min_ratio_ctc0"] != expected["beam6_ctc0"]
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


def test_ctc_prefix_scores_are_speechbrains() -> None:
    """CTCPrefixScorer's increments equal CTCPrefixScore's step by step, over padded items and
    extensions that repeat the prefix's last token."""
    rng = np.random.default_rng(0)
    batch, frames, vocab, beam = 3, 20, 12, 4
    log_probs = torch.log_softmax(torch.from_numpy(rng.normal(size=(batch, frames, vocab))
                                                   .astype(np.float32) * 3), dim=-1)
    lengths = torch.tensor([20, 15, 7])
    theirs = CTCPrefixScore(log_probs.clone(), lengths, blank_index=0, eos_index=2)
    ours = CTCPrefixScorer(log_probs.numpy(), lengths.numpy(), blank_id=0, eos_id=2,
                           beam_size=beam)
    last, memory = torch.full((batch * beam,), 1), None
    for step in range(12):
        expected, memory = theirs.forward_step(last, memory)
        increments, scored = ours.score(last.numpy())
        np.testing.assert_allclose(increments, expected.numpy(), rtol=1e-6, atol=1e-4)
        choices = beam * vocab if step else vocab  # one live beam at first
        candidates = np.stack([rng.choice(choices, beam, replace=False) for _ in range(batch)])
        candidates[0, 0] = int(last[0]) if step else 1  # a repeat of the last token
        memory = theirs.permute_mem(memory, torch.from_numpy(candidates))
        ours.select(scored, candidates)
        np.testing.assert_allclose(ours.r, memory[0].numpy(), rtol=1e-6, atol=1e-4)
        last = torch.from_numpy(candidates % vocab).reshape(-1)


def test_refuses_what_it_cannot_do(demo: dict) -> None:
    """No attention weights for the attention-shift limit; a search of no step (where
    SpeechBrain fails) gives empty hypotheses."""
    args = (MambaStep(demo), demo["enc"].numpy(), demo["lengths"].numpy(), demo["ctc"].numpy())
    with pytest.raises(ValueError, match="using_max_attn_shift"):
        beam_search(*args, demo_options(demo, using_max_attn_shift=True))
    with pytest.raises(ValueError, match="max_decode_ratio 2"):
        beam_search(*args, demo_options(demo, max_decode_ratio=2.0))
    assert beam_search(*args, demo_options(demo, max_decode_ratio=0.01)) == [[]] * len(LENGTHS)


def test_transformer_decoder_same_hypotheses_as_speechbrain(demo: dict) -> None:
    """The stateless path (the whole prefix each step): S2STransformerBeamSearcher's
    hypotheses, with CTC and the LM, for a Transformer decoder."""
    torch.manual_seed(5)
    net = TransformerASR(
        demo["output_neurons"], 160, demo["d_model"], demo["nhead"], 1, 1, 128,
        activation=torch.nn.GELU, encoder_module="conmamba", decoder_module="transformer",
        attention_type=demo["attention_type"], normalize_before=True, causal=False,
        mamba_config=demo["mamba_config"],
    ).eval()
    options = demo_options(demo, lm_weight=0.3)
    expected = speechbrain_search(demo, options, True, S2STransformerBeamSearcher, net)
    ours = beam_search(TransformerStep(net, demo["seq_lin"]), demo["enc"].numpy(),
                       demo["lengths"].numpy(), demo["ctc"].numpy(), options,
                       lm=LMStep(demo["lm"]))
    assert ours == expected
    assert expected != speechbrain_search(demo, options, True)  # not the Mamba decoder's
