"""Mamba / BiMamba blocks, ConMamba encoder, Mamba decoder and TransformerASR."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import n_params
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.nnet.linear import Linear
from torch import nn

from modules.Conmamba import (
    ConmambaEncoder,
    ConmambaEncoderLayer,
    MambaDecoder,
    MambaDecoderLayer,
)
from modules.mamba import selective_scan_interface as ssi
from modules.mamba.bimamba import Mamba, flip_valid
from modules.mamba.selective_scan_ref import selective_scan_ref
from modules.TransformerASR import TransformerASR

MAMBA_CONFIG = {"d_state": 16, "expand": 2, "d_conv": 4, "bidirectional": True}
SMALL_CONFIG = {"d_state": 4, "expand": 2, "d_conv": 4, "bidirectional": True}
TOL = 1e-5


def padding_mask(lengths: list[int], max_len: int) -> torch.Tensor:
    """(B, L) True on padding, as SpeechBrain's key padding masks."""
    return torch.arange(max_len) >= torch.tensor(lengths).unsqueeze(1)


# --------------------------------------------------------------------------- Mamba block

MAMBA_KEYS = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
              "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"]
BIMAMBA_KEYS = MAMBA_KEYS + ["A_b_log", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight",
                             "dt_proj_b.weight", "dt_proj_b.bias", "D_b"]


def mamba_params_by_hand(d: int, n: int = 16, k: int = 4, expand: int = 2, bi: bool = False) -> int:
    """Parameter count from the shapes of mamba-ssm's Mamba (bias=False, conv_bias=True)."""
    di, r = expand * d, math.ceil(d / 16)
    direction = di * k + di + di * (r + 2 * n) + r * di + di + di * n + di
    return d * 2 * di + direction * (2 if bi else 1) + di * d


@pytest.mark.parametrize("d_model", [144, 256, 512])
@pytest.mark.parametrize("bi", [False, True])
def test_mamba_param_names_and_counts(d_model: int, bi: bool) -> None:
    m = Mamba(d_model, bimamba_type="v2" if bi else "none")
    assert sorted(m.state_dict()) == sorted(BIMAMBA_KEYS if bi else MAMBA_KEYS)
    assert n_params(m) == mamba_params_by_hand(d_model, bi=bi)
    di, r = 2 * d_model, math.ceil(d_model / 16)
    assert m.x_proj.weight.shape == (r + 32, di)
    assert m.conv1d.weight.shape == (di, 1, 4)


def test_mamba_ssm_initialisation() -> None:
    torch.manual_seed(0)
    m = Mamba(64, bimamba_type="v2", dt_min=0.001, dt_max=0.1)
    s4d = torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(128, 1)
    for a_log, d_skip, dt_proj in ((m.A_log, m.D, m.dt_proj), (m.A_b_log, m.D_b, m.dt_proj_b)):
        assert a_log.dtype == torch.float32
        assert torch.equal(a_log.data, s4d)
        assert torch.equal(d_skip.data, torch.ones(128))
        dt = F.softplus(dt_proj.bias.data)
        assert float(dt.min()) >= 0.001 * (1 - 1e-5) and float(dt.max()) <= 0.1 * (1 + 1e-5)
        assert float(dt_proj.weight.detach().abs().max()) <= 4**-0.5  # dt_rank 4: uniform(+-1/2)
    with pytest.raises(ValueError, match="bimamba_type"):
        Mamba(16, bimamba_type="v1")


def reference_mamba(m: Mamba, u: torch.Tensor) -> torch.Tensor:
    """mamba-ssm / upstream GPU semantics, written out with the sequential scan (no padding)."""
    length = u.shape[1]

    def direction(xz, conv, x_proj, dt_proj, a_log, d_skip):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :length])
        dt, b, c = x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], -1)
        delta = (dt @ dt_proj.weight.T).transpose(1, 2)
        return selective_scan_ref(
            x, delta, -torch.exp(a_log), b.transpose(1, 2), c.transpose(1, 2), d_skip, z=z,
            delta_bias=dt_proj.bias, delta_softplus=True,
        )

    xz = m.in_proj(u).transpose(1, 2)
    y = direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    if m.bimamba_type == "v2":
        y_b = direction(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b)
        y = 0.5 * y + 0.5 * y_b.flip(-1) if m.if_devide_out else y + y_b.flip(-1)
    return m.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("bimamba_type", ["none", "v2"])
@pytest.mark.parametrize("divide", [True, False])
def test_mamba_matches_reference_semantics(bimamba_type: str, divide: bool) -> None:
    torch.manual_seed(1)
    m = Mamba(32, d_state=8, bimamba_type=bimamba_type, if_devide_out=divide).double()
    u = torch.randn(2, 37, 32, dtype=torch.float64)
    out = m(u)
    ref = reference_mamba(m, u)
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_flip_valid_reverses_only_valid_frames() -> None:
    x = torch.arange(12.0).view(2, 1, 6)
    out = flip_valid(x, torch.tensor([6, 4]))
    assert out[0, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert out[1, 0].tolist() == [9, 8, 7, 6, 10, 11]
    assert torch.equal(flip_valid(out, torch.tensor([6, 4])), x)


@pytest.mark.parametrize("bimamba_type", ["none", "v2"])
def test_mamba_padding_invariance(bimamba_type: str) -> None:
    torch.manual_seed(2)
    m = Mamba(24, d_state=8, bimamba_type=bimamba_type)
    lengths = [29, 17, 4, 1]
    x = torch.randn(4, 29, 24)
    x[1, 17:] = 100.0  # loud padding must not leak
    out = m(x, torch.tensor(lengths))
    for i, n in enumerate(lengths):
        alone = m(x[i : i + 1, :n])
        assert (out[i, :n] - alone[0]).abs().max() <= TOL
        assert float(out[i, n:].abs().sum()) == 0.0
    # Without lengths the padding does reach the reverse direction (upstream's behaviour).
    if bimamba_type == "v2":
        leaky = m(x)
        assert (leaky[1, :17] - m(x[1:2, :17])[0]).abs().max() > 1e-3


def test_mamba_bad_lengths_error() -> None:
    m = Mamba(8, d_state=4)
    with pytest.raises(ValueError, match=r"lengths must be \(2,\) ints in \[0, 5\]"):
        m(torch.randn(2, 5, 8), torch.tensor([5, 6]))


def test_mamba_step_continues_from_state() -> None:
    torch.manual_seed(3)
    m = Mamba(16, d_state=8)
    x = torch.randn(3, 20, 16)
    lengths = torch.tensor([7, 3, 1])
    _, state = m(x[:, :7], lengths, return_state=True)
    full = m(x)
    for i, n in enumerate(lengths.tolist()):
        s = state.index_select(torch.tensor([i]))
        steps = []
        for t in range(n, 20):
            out, s = m.step(x[i : i + 1, t : t + 1], s)
            steps.append(out)
        assert (torch.cat(steps, 1)[0] - full[i, n:]).abs().max() <= TOL
    with pytest.raises(ValueError, match="unidirectional"):
        Mamba(16, bimamba_type="v2").step(x[:, :1], state)


# --------------------------------------------------------------------------- encoder

def ffn_params(d: int, f: int) -> int:
    return 2 * d + (d * f + f) + (f * d + d)  # LayerNorm + Linear(d, f) + Linear(f, d)


def conv_module_params(d: int, k: int = 31) -> int:
    return 2 * d + (d * 2 * d + 2 * d) + (d * k + d) + 2 * d + (d * d + d)


def conmamba_layer_params(d: int, f: int, bi: bool = True) -> int:
    return 2 * ffn_params(d, f) + 2 * 2 * d + conv_module_params(d) + mamba_params_by_hand(
        d, bi=bi
    )


CONMAMBA_LAYER_KEYS = (
    [f"mamba.{k}" for k in BIMAMBA_KEYS]
    + [f"convolution_module.{k}" for k in [
        "layer_norm.weight", "layer_norm.bias", "bottleneck.0.weight", "bottleneck.0.bias",
        "conv.weight", "conv.bias", "after_conv.0.weight", "after_conv.0.bias",
        "after_conv.2.weight", "after_conv.2.bias"]]
    + [f"ffn_module{i}.{k}" for i in (1, 2) for k in [
        "0.weight", "0.bias", "1.ffn.0.weight", "1.ffn.0.bias", "1.ffn.3.weight", "1.ffn.3.bias"]]
    + ["norm1.norm.weight", "norm1.norm.bias", "norm2.norm.weight", "norm2.norm.bias"]
)


def test_conmamba_layer_names_and_counts() -> None:
    layer = ConmambaEncoderLayer(144, 1024, mamba_config=MAMBA_CONFIG)
    assert sorted(layer.state_dict()) == sorted(CONMAMBA_LAYER_KEYS)
    assert n_params(layer) == conmamba_layer_params(144, 1024)
    causal = ConmambaEncoderLayer(144, 1024, causal=True, mamba_config=MAMBA_CONFIG)
    assert n_params(causal) == conmamba_layer_params(144, 1024, bi=False)
    assert MAMBA_CONFIG["bidirectional"] is True  # the config is not mutated
    encoder = ConmambaEncoder(3, 144, 1024, mamba_config=MAMBA_CONFIG)
    assert n_params(encoder) == 3 * conmamba_layer_params(144, 1024) + 2 * 144
    assert {k.split(".")[0] for k in encoder.state_dict()} == {"layers", "norm"}


@pytest.mark.parametrize("causal", [False, True])
def test_conmamba_encoder_padding_invariance(causal: bool) -> None:
    torch.manual_seed(4)
    enc = ConmambaEncoder(2, 32, 64, kernel_size=7, causal=causal, mamba_config=SMALL_CONFIG)
    enc.eval()
    lengths = [40, 23, 9]
    x = torch.randn(3, 40, 32)
    x[2, 9:] = -50.0
    out, _ = enc(x, src_key_padding_mask=padding_mask(lengths, 40))
    for i, n in enumerate(lengths):
        alone, _ = enc(x[i : i + 1, :n])
        assert (out[i, :n] - alone[0]).abs().max() <= TOL


def test_conmamba_causal_encoder_ignores_the_future() -> None:
    torch.manual_seed(5)
    enc = ConmambaEncoder(2, 32, 64, kernel_size=7, causal=True, mamba_config=SMALL_CONFIG)
    enc.eval()
    x = torch.randn(1, 30, 32)
    y = x.clone()
    y[:, 18:] = torch.randn(1, 12, 32)
    a, _ = enc(x)
    b, _ = enc(y)
    assert (a[:, :18] - b[:, :18]).abs().max() <= TOL
    assert (a[:, 18:] - b[:, 18:]).abs().max() > 1e-2
    bidir = ConmambaEncoder(2, 32, 64, kernel_size=7, mamba_config=SMALL_CONFIG).eval()
    assert (bidir(x)[0][:, :18] - bidir(y)[0][:, :18]).abs().max() > 1e-2


# --------------------------------------------------------------------------- decoder

MAMBA_DECODER_LAYER_KEYS = (
    [f"{m}.{k}" for m in ("self_mamba", "cross_mamba") for k in MAMBA_KEYS]
    + ["pos_ffn.ffn.0.weight", "pos_ffn.ffn.0.bias", "pos_ffn.ffn.3.weight", "pos_ffn.ffn.3.bias"]
    + [f"norm{i}.norm.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
)


def test_mamba_decoder_names_and_counts() -> None:
    layer = MambaDecoderLayer(144, 1024, mamba_config=MAMBA_CONFIG)
    assert sorted(layer.state_dict()) == sorted(MAMBA_DECODER_LAYER_KEYS)
    by_hand = 2 * mamba_params_by_hand(144) + (144 * 1024 + 1024 + 1024 * 144 + 144) + 3 * 288
    assert n_params(layer) == by_hand
    assert n_params(MambaDecoder(4, 144, 1024, mamba_config=MAMBA_CONFIG)) == 4 * by_hand + 288


@pytest.mark.parametrize("normalize_before", [True, False])
def test_mamba_decoder_padding_invariance(normalize_before: bool) -> None:
    """Each item equals its run alone: valid memory directly followed by its target."""
    torch.manual_seed(6)
    dec = MambaDecoder(2, 32, 64, normalize_before=normalize_before, mamba_config=SMALL_CONFIG)
    dec.eval()
    mem_lengths = [25, 12, 3]
    memory = torch.randn(3, 25, 32)
    memory[1, 12:] = 30.0
    tgt = torch.randn(3, 8, 32)
    out, _, _ = dec(tgt, memory, memory_key_padding_mask=padding_mask(mem_lengths, 25))
    for i, n in enumerate(mem_lengths):
        alone, _, _ = dec(tgt[i : i + 1], memory[i : i + 1, :n])
        assert (out[i] - alone[0]).abs().max() <= TOL
    # Target padding (at the end) cannot reach valid target frames: the decoder is causal.
    short, _, _ = dec(tgt[:, :5], memory, memory_key_padding_mask=padding_mask(mem_lengths, 25))
    assert (short - out[:, :5]).abs().max() <= TOL


def test_mamba_decoder_steps_equal_full_forward() -> None:
    torch.manual_seed(7)
    dec = MambaDecoder(2, 32, 64, normalize_before=True, mamba_config=SMALL_CONFIG).eval()
    memory = torch.randn(3, 20, 32)
    lengths = torch.tensor([20, 11, 5])
    tgt = torch.randn(3, 9, 32)
    full, _, _ = dec(tgt, memory, memory_key_padding_mask=padding_mask([20, 11, 5], 20))
    state = dec.init_state(memory, lengths)
    steps = []
    for t in range(9):
        out, state = dec.step(tgt[:, t : t + 1], state)
        steps.append(out)
    assert (torch.cat(steps, 1) - full).abs().max() <= TOL
    # Reordering (beam search) selects the matching items.
    picked = MambaDecoder.reorder_state(dec.init_state(memory, lengths), torch.tensor([2, 0]))
    out, _ = dec.step(tgt[[2, 0], :1], picked)
    assert (out - full[[2, 0], :1]).abs().max() <= TOL


# --------------------------------------------------------------------------- TransformerASR

def recipe_model(encoder: str, decoder: str, d: int, nhead: int, n_enc: int, n_dec: int,
                 d_ffn: int, vocab: int) -> nn.ModuleList:
    """``hparams['model']`` of upstream's recipes: CNN front-end, TransformerASR, output layers."""
    cnn = ConvolutionFrontEnd(
        input_shape=(8, 10, 80), num_blocks=2, num_layers_per_block=1, out_channels=(64, 32),
        kernel_sizes=(3, 3), strides=(2, 2), residuals=(False, False),
    )
    transformer = TransformerASR(
        vocab, 640, d, nhead, n_enc, n_dec, d_ffn, 0.1, nn.GELU, encoder_module=encoder,
        decoder_module=decoder, attention_type="RelPosMHAXL", normalize_before=True,
        causal=False, mamba_config=MAMBA_CONFIG,
    )
    heads = [Linear(input_size=d, n_neurons=vocab) for _ in range(2 if n_dec else 1)]
    return nn.ModuleList([cnn, transformer, *heads])


# Totals of hparams['model'] in xi-j/Mamba-ASR's configs (shared/REFERENCE.md).
UPSTREAM_TOTALS = [
    ("conformer", "transformer", 256, 4, 18, 0, 1024, 31, 28_786_111),  # CTC conformer_large
    ("conmamba", "transformer", 256, 4, 18, 0, 1024, 31, 31_555_519),  # CTC conmamba_large
    ("conformer", "transformer", 144, 4, 12, 4, 1024, 5000, 13_327_296),
    ("conmamba", "transformer", 144, 4, 12, 4, 1024, 5000, 14_075_520),
    ("conmamba", "mamba", 144, 4, 12, 4, 1024, 5000, 14_570_880),
    ("conmamba", "mamba", 512, 8, 12, 6, 2048, 5000, 122_917_040),
]


@pytest.mark.parametrize("config", UPSTREAM_TOTALS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_recipe_parameter_totals_equal_upstream(config: tuple) -> None:
    *args, expected = config
    assert n_params(recipe_model(*args)) == expected


def test_conmamba_mamba_param_count_by_hand() -> None:
    """The 14,570,880 of conmambamamba_small, rebuilt from per-module formulas."""
    d, f, vocab = 144, 1024, 5000
    # Conv2d + LayerNorm over (frequency, channels) per block: 80 -> 40 -> 20 bins.
    cnn = (1 * 64 * 9 + 64) + 2 * 40 * 64 + (64 * 32 * 9 + 32) + 2 * 20 * 32
    encoder = 12 * conmamba_layer_params(d, f) + 2 * d
    decoder_layer = 2 * mamba_params_by_hand(d) + (d * f + f + f * d + d) + 3 * 2 * d
    decoder = 4 * decoder_layer + 2 * d
    total = (cnn + (640 * d + d) + encoder + vocab * d + decoder + 2 * (d * vocab + vocab))
    assert total == 14_570_880


def test_transformer_asr_keys() -> None:
    model = TransformerASR(
        50, 40, 32, 4, 2, 2, 64, encoder_module="conmamba", decoder_module="mamba",
        attention_type="RelPosMHAXL", normalize_before=True, causal=False,
        mamba_config=SMALL_CONFIG,
    )
    tops = {".".join(k.split(".")[:2]) for k in model.state_dict()}
    assert tops == {"positional_encoding.inv_freq", "positional_encoding_decoder.pe",
                    "custom_src_module.layers", "custom_tgt_module.layers", "encoder.layers",
                    "encoder.norm", "decoder.layers", "decoder.norm"}
    assert "custom_tgt_module.layers.0.emb.Embedding.weight" in model.state_dict()
    assert "custom_src_module.layers.0.w.weight" in model.state_dict()
    # Checkpoints without the constant positional tables load strictly; parameters must match.
    state = {k: v for k, v in model.state_dict().items() if "positional_encoding" not in k}
    fresh = TransformerASR(
        50, 40, 32, 4, 2, 2, 64, encoder_module="conmamba", decoder_module="mamba",
        attention_type="RelPosMHAXL", normalize_before=True, causal=False,
        mamba_config=SMALL_CONFIG,
    )
    fresh.load_state_dict(state, strict=True)
    a_log = fresh.decoder.layers[1].cross_mamba.A_log
    assert torch.equal(a_log, model.decoder.layers[1].cross_mamba.A_log)
    del state["decoder.layers.1.cross_mamba.A_log"]
    with pytest.raises(RuntimeError, match="cross_mamba.A_log"):
        fresh.load_state_dict(state, strict=True)


def small_asr(**kwargs) -> TransformerASR:
    args = dict(tgt_vocab=40, input_size=24, d_model=32, nhead=4, num_encoder_layers=2,
                num_decoder_layers=2, d_ffn=64, encoder_module="conmamba",
                decoder_module="mamba", attention_type="RelPosMHAXL", normalize_before=True,
                causal=False, mamba_config=SMALL_CONFIG, kernel_size=7, dropout=0.0)
    args.update(kwargs)
    return TransformerASR(**args).eval()


def test_transformer_asr_mamba_init_option() -> None:
    torch.manual_seed(8)
    s4d = torch.log(torch.arange(1, 5, dtype=torch.float32)).repeat(64, 1)
    xavier = small_asr()
    kept = small_asr(mamba_init="mamba")
    a_xavier = xavier.encoder.layers[0].mamba.A_log
    assert not torch.equal(a_xavier.data, s4d)
    std = math.sqrt(2.0 / (64 + 4))  # Xavier-normal std of a (64, 4) matrix
    assert abs(float(a_xavier.std()) - std) < 0.25 * std
    for m in kept.modules():
        if isinstance(m, Mamba):
            assert torch.equal(m.A_log.data, s4d)
    w_kept, w_xavier = (m.custom_src_module.layers[0].w.weight for m in (kept, xavier))
    assert not torch.equal(w_kept, w_xavier)
    with pytest.raises(ValueError, match="mamba_init must be one of xavier, mamba"):
        small_asr(mamba_init="kaiming")


def test_transformer_asr_config_errors() -> None:
    with pytest.raises(ValueError, match="encoder_module must be one of"):
        small_asr(encoder_module="mamba")
    with pytest.raises(ValueError, match="mamba_config is required"):
        small_asr(mamba_config=None)
    with pytest.raises(ValueError, match="normalize_before must be True"):
        small_asr(normalize_before=False)


@pytest.mark.parametrize("decoder_module", ["mamba", "transformer"])
def test_transformer_asr_padding_invariance(decoder_module: str) -> None:
    """encode() with relative wav_len and forward() equal each item run alone."""
    torch.manual_seed(9)
    model = small_asr(decoder_module=decoder_module)
    feats = torch.randn(3, 30, 24)
    lengths = [30, 21, 8]
    wav_len = torch.tensor(lengths) / 30
    tokens = torch.randint(3, 40, (3, 6))
    enc = model.encode(feats, wav_len)
    enc_out, dec_out = model(feats, tokens, wav_len)
    assert (enc - enc_out).abs().max() <= TOL
    for i, n in enumerate(lengths):
        alone_enc, alone_dec = model(feats[i : i + 1, :n], tokens[i : i + 1])
        assert (enc_out[i, :n] - alone_enc[0]).abs().max() <= TOL
        assert (dec_out[i] - alone_dec[0]).abs().max() <= TOL


def test_transformer_asr_decode_step_equals_decode() -> None:
    torch.manual_seed(10)
    model = small_asr()
    feats = torch.randn(2, 25, 24)
    wav_len = torch.tensor([1.0, 0.6])
    enc = model.encode(feats, wav_len)
    enc_len = torch.round(wav_len * 25)
    tokens = torch.randint(3, 40, (2, 7))
    full, _ = model.decode(tokens, enc, enc_len)
    state = model.init_decoder_state(enc, enc_len)
    for t in range(7):
        out, state = model.decode_step(tokens[:, t], t, state)
        assert (out[:, 0] - full[:, t]).abs().max() <= TOL
    shapes = [tuple(s.shape) for layer in state for pair in layer for s in pair]
    for t in range(7, 500):  # the state does not grow with the prefix
        _, state = model.decode_step(tokens[:, 0], t, state)
    assert [tuple(s.shape) for layer in state for pair in layer for s in pair] == shapes
    with pytest.raises(ValueError, match="decoder_module='mamba'"):
        small_asr(decoder_module="transformer").init_decoder_state(enc)


def test_conmamba_training_step_gradients() -> None:
    torch.manual_seed(11)
    model = small_asr()
    model.train()
    feats = torch.randn(2, 20, 24)
    enc, dec = model(feats, torch.randint(3, 40, (2, 5)), torch.tensor([1.0, 0.5]))
    (enc.pow(2).mean() + dec.pow(2).mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["encoder.layers.0.mamba.A_b_log"].abs().sum() > 0
    assert grads["decoder.layers.0.cross_mamba.dt_proj.bias"].abs().sum() > 0


# --------------------------------------------------------------------------- CUDA

def _cuda_kernels_missing() -> str | None:
    """Why impl='cuda' cannot run here, or None when both CUDA kernels import."""
    if not torch.cuda.is_available():
        return "CUDA not available"
    reasons = [k.reason for k in (ssi._load_mamba_ssm(), ssi._load_causal_conv1d()) if k.fn is None]
    return "; ".join(reasons) or None


@pytest.fixture(params=["torch", "cuda", "triton"])
def on_gpu(request, monkeypatch) -> Callable[[], contextlib.AbstractContextManager]:
    """A context forcing each CUDA path in turn: our PyTorch scan, mamba-ssm's and
    causal-conv1d's kernels, our Triton scan (the CPU references run outside it, on the
    default path)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    if request.param == "cuda" and (why := _cuda_kernels_missing()):
        pytest.skip(f"CUDA kernels unavailable: {why}")
    triton_scan, triton_why = ssi._load_triton_scan()
    if request.param == "triton" and triton_scan is None:
        pytest.skip(f"triton unavailable: {triton_why}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32 convolutions
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    @contextlib.contextmanager
    def forced() -> Iterator[None]:
        with monkeypatch.context() as m:
            m.setenv("MAMBA_ASR_SCAN_IMPL", request.param)
            yield

    return forced


def _cuda_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).cuda()


@pytest.mark.parametrize("bimamba_type", ["none", "v2"])
def test_cuda_mamba_matches_cpu_and_ignores_padding(on_gpu, bimamba_type: str) -> None:
    torch.manual_seed(12)
    m = Mamba(48, d_state=16, bimamba_type=bimamba_type)
    lengths = [70, 41, 3]
    x = torch.randn(3, 70, 48)
    x[1, 41:] = 100.0
    ref = m(x, torch.tensor(lengths))
    mc, xc = _cuda_copy(m), x.cuda()
    leaves = xc.clone().requires_grad_()
    with on_gpu():
        out = mc(xc, torch.tensor(lengths))
        alone = [mc(xc[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
        mc(leaves, torch.tensor(lengths)).pow(2).sum().backward()
    assert (out.cpu() - ref).abs().max() <= 1e-4 * ref.abs().max()
    for i, n in enumerate(lengths):
        assert (out[i, :n] - alone[i]).abs().max() <= TOL
    x_cpu = x.clone().requires_grad_()
    m(x_cpu, torch.tensor(lengths)).pow(2).sum().backward()
    assert (leaves.grad.cpu() - x_cpu.grad).abs().max() <= 1e-3 * x_cpu.grad.abs().max()
    assert float(leaves.grad[1, 41:].abs().sum()) == 0.0


def test_cuda_encoder_decoder_match_cpu(on_gpu) -> None:
    torch.manual_seed(13)
    model = small_asr()
    feats = torch.randn(3, 30, 24)
    wav_len = torch.tensor([1.0, 0.7, 0.3])
    tokens = torch.randint(3, 40, (3, 6))
    enc, dec = model(feats, tokens, wav_len)
    gpu = _cuda_copy(model)
    enc_len = torch.round(wav_len * 30).cuda()
    with on_gpu():
        enc_c, dec_c = gpu(feats.cuda(), tokens.cuda(), wav_len.cuda())
        # Incremental decoding on the GPU equals the full decoder pass.
        full, _ = gpu.decode(tokens.cuda(), enc_c, enc_len)
        state = gpu.init_decoder_state(enc_c, enc_len)
        steps = []
        for t in range(6):
            out, state = gpu.decode_step(tokens[:, t].cuda(), t, state)
            steps.append(out[:, 0])
    assert (enc_c.cpu() - enc).abs().max() <= 1e-4 * enc.abs().max()
    assert (dec_c.cpu() - dec).abs().max() <= 1e-4 * dec.abs().max()
    assert (torch.stack(steps, 1) - full).abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_training_step(on_gpu, dtype: torch.dtype) -> None:
    """Mixed precision (the recipes' --precision bf16/fp16) trains and decodes on each path:
    the loss is scaled as GradScaler does (2**16), and the gradients point the fp32 way."""
    torch.manual_seed(14)
    model = small_asr().train()
    feats = torch.randn(2, 40, 24)
    wav_len = torch.tensor([1.0, 0.55])
    tokens = torch.randint(3, 40, (2, 5))
    gpu = _cuda_copy(model)

    def scaled_loss(enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return 2.0**16 * (enc.float().pow(2).mean() + dec.float().pow(2).mean())

    ref_enc, ref_dec = model(feats, tokens, wav_len)
    scaled_loss(ref_enc, ref_dec).backward()
    with on_gpu(), torch.autocast("cuda", dtype=dtype):
        enc, dec = gpu(feats.cuda(), tokens.cuda(), wav_len.cuda())
        scaled_loss(enc, dec).backward()
        state = gpu.init_decoder_state(enc, torch.tensor([40.0, 22.0], device="cuda"))
        out, _ = gpu.decode_step(tokens[:, 0].cuda(), 0, state)
    assert (enc.float().cpu() - ref_enc).abs().max() <= 5e-2 * ref_enc.abs().max()
    assert torch.isfinite(out.float()).all()
    grads = torch.cat([p.grad.flatten().cpu() for p in gpu.parameters()])
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads).all()
    assert F.cosine_similarity(grads, ref, 0) >= 0.999
    assert gpu.encoder.layers[0].mamba.A_b_log.grad.abs().sum() > 0
