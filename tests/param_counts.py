"""Parameter totals of the recipes' ``hparams['model']`` from their architecture, by hand.

The block formulas (Mamba, ConMamba layer, feed-forward, convolution module) are those of
``test_mamba_modules.py``; here they are assembled with SpeechBrain's front-end, Conformer
attention, embedding and output layers into whole models. The tests check the formulas
against upstream's totals (``shared/REFERENCE.md``) for the configurations that have one
before trusting them for our own (small CTC, demo) configurations.
"""

from __future__ import annotations

from test_mamba_modules import (
    conmamba_layer_params,
    conv_module_params,
    ffn_params,
    mamba_params_by_hand,
)


def frontend_params(n_mels: int, channels: tuple[int, ...]) -> int:
    """SpeechBrain's ``ConvolutionFrontEnd`` of stride-2, 3x3 blocks: each a Conv2d and a
    LayerNorm over (mel bins after the stride, channels)."""
    total, c_in, bins = 0, 1, n_mels
    for c in channels:
        bins //= 2
        total += (c_in * c * 9 + c) + 2 * bins * c
        c_in = c
    return total


def conformer_layer_params(d: int, f: int) -> int:
    """SpeechBrain's ``ConformerEncoderLayer`` with ``RelPosMHAXL`` attention (in_proj 3d x d,
    out_proj d x d + d, linear_pos d x d, pos_bias_u and pos_bias_v d each), two
    feed-forward modules, the convolution module and two LayerNorms."""
    attention = 3 * d * d + (d * d + d) + d * d + 2 * d
    return 2 * ffn_params(d, f) + conv_module_params(d) + attention + 2 * 2 * d


def encoder_params(
    encoder: str, d: int, f: int, layers: int, n_mels: int, channels: tuple[int, ...]
) -> int:
    """Front-end, input Linear (channels[-1] x n_mels/4 -> d), ``layers`` Conformer, ConMamba
    or causal ConMamba ("conmamba_causal": unidirectional Mamba) layers and the final
    LayerNorm."""
    if encoder == "conformer":
        layer = conformer_layer_params(d, f)
    else:
        layer = conmamba_layer_params(d, f, bi=encoder != "conmamba_causal")
    features = channels[-1] * (n_mels // 4)
    return frontend_params(n_mels, channels) + (features * d + d) + layers * layer + 2 * d


def ctc_model_params(
    encoder: str, d: int, f: int, layers: int, n_mels: int = 80,
    channels: tuple[int, ...] = (64, 32), vocab: int = 31,
) -> int:
    """[CNN, Transformer (encoder only), ctc_lin] of the CTC recipe."""
    return encoder_params(encoder, d, f, layers, n_mels, channels) + (d * vocab + vocab)


def s2s_mamba_model_params(
    d: int, f: int, enc_layers: int, dec_layers: int, vocab: int, n_mels: int = 80,
    channels: tuple[int, ...] = (64, 32),
) -> int:
    """[CNN, Transformer (ConMamba encoder, Mamba decoder), seq_lin, ctc_lin] of the S2S
    recipe: the decoder is a token embedding, layers of two unidirectional Mambas, a
    feed-forward and three LayerNorms, and a final LayerNorm."""
    decoder_layer = 2 * mamba_params_by_hand(d) + (d * f + f) + (f * d + d) + 3 * 2 * d
    decoder = vocab * d + dec_layers * decoder_layer + 2 * d
    heads = 2 * (d * vocab + vocab)
    return encoder_params("conmamba", d, f, enc_layers, n_mels, channels) + decoder + heads
