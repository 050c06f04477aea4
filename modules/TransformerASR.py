"""SpeechBrain's TransformerASR with ConMamba encoders and Mamba decoders.

``TransformerASR`` extends SpeechBrain's
:class:`speechbrain.lobes.models.transformer.TransformerASR.TransformerASR` (the same
constructor, ``forward``, ``encode(src, wav_len)`` with relative lengths and
``decode(tgt, encoder_out, enc_len)`` with absolute lengths) by

* ``encoder_module``: "transformer" | "conformer" | "branchformer" (SpeechBrain's) | "conmamba"
  (:class:`modules.Conmamba.ConmambaEncoder`);
* ``decoder_module``: "transformer" (SpeechBrain's) | "mamba"
  (:class:`modules.Conmamba.MambaDecoder`);
* ``mamba_config``: ``{d_state, expand, d_conv, bidirectional}`` and other ``Mamba`` arguments;
* ``forward(src, tgt, wav_len, pad_idx, dynchunktrain_config=None)``: SpeechBrain's Dynamic
  Chunk Training configuration (chunked attention masks and Dynamic Chunk Convolution) reaches
  the encoder through ``forward`` too (SpeechBrain's passes it through ``encode`` only);
* ``stream_chunk_size`` / ``stream_left_context``: the model's streaming configuration
  (:attr:`TransformerASR.streaming_config`, a ``DynChunkTrainConfig`` of chunk size in encoder
  frames and left context in chunks) for streaming inference of a DCT-trained Conformer. It is
  metadata: ``encode`` without a ``dynchunktrain_config`` attends to the full context;
* ``mamba_init``: "xavier" (default) re-initialises every parameter with more than one dimension
  Xavier-normal, Mamba's ``A_log`` and projections included, as xi-j/Mamba-ASR does (the paper's
  models were trained that way); "mamba" keeps mamba-ssm's own initialisation inside the Mamba
  blocks (S4D-real ``A_log``, dt projection) and re-initialises the rest.

Module paths and parameter names are those of xi-j/Mamba-ASR (``custom_src_module``,
``encoder``, ``custom_tgt_module``, ``decoder``, ``positional_encoding[_decoder]``), so its
checkpoints load strictly. As there, the ConMamba encoder uses ``branchformer_activation``
(GELU by default) in its feed-forward and convolution modules, and ignores the relative
positional encoding SpeechBrain computes for ``attention_type: RelPosMHAXL``.

For the Mamba decoder, :meth:`TransformerASR.init_decoder_state` /
:meth:`TransformerASR.decode_step` decode one token per call from cached per-layer states.
"""

from __future__ import annotations

from typing import Any

import torch
from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding
from speechbrain.lobes.models.transformer.TransformerASR import (
    TransformerASR as SBTransformerASR,
)
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.containers import ModuleList
from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig
from torch import Tensor, nn

from modules.Conmamba import ConmambaEncoder, DecoderState, MambaDecoder
from modules.mamba.bimamba import Mamba

__all__ = ["TransformerASR"]

ENCODERS = ("transformer", "conformer", "branchformer", "conmamba")
DECODERS = ("transformer", "mamba")
MAMBA_INITS = ("xavier", "mamba")


class TransformerASR(SBTransformerASR):
    """Encoder-decoder (or encoder-only, ``num_decoder_layers=0``) ASR model.

    src (B, L, input_size) -> encoder_out (B, L, d_model); tgt (B, T) tokens -> (B, T, d_model).
    Arguments as SpeechBrain's TransformerASR plus ``decoder_module``, ``mamba_config``,
    ``mamba_init``, ``stream_chunk_size`` and ``stream_left_context`` (see the module docstring).
    """

    def __init__(
        self,
        tgt_vocab: int,
        input_size: int,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ffn: int = 2048,
        dropout: float = 0.1,
        activation: type = nn.ReLU,
        positional_encoding: str | None = "fixed_abs_sine",
        normalize_before: bool = False,
        kernel_size: int = 31,
        bias: bool = True,
        encoder_module: str = "transformer",
        decoder_module: str = "transformer",
        conformer_activation: type = Swish,
        branchformer_activation: type = nn.GELU,
        attention_type: str = "regularMHA",
        max_length: int = 2500,
        causal: bool | None = None,
        csgu_linear_units: int = 3072,
        gate_activation: type = nn.Identity,
        use_linear_after_conv: bool = False,
        output_hidden_states: bool = False,
        layerdrop_prob: float = 0.0,
        mamba_config: dict[str, Any] | None = None,
        mamba_init: str = "xavier",
        stream_chunk_size: int | None = None,
        stream_left_context: int | None = None,
    ) -> None:
        _check_choice("encoder_module", encoder_module, ENCODERS)
        _check_choice("decoder_module", decoder_module, DECODERS)
        _check_choice("mamba_init", mamba_init, MAMBA_INITS)
        mamba_decoder = decoder_module == "mamba" and num_decoder_layers > 0
        uses_mamba = encoder_module == "conmamba" and num_encoder_layers > 0 or mamba_decoder
        if uses_mamba and not mamba_config:
            raise ValueError(
                "mamba_config is required with encoder_module=conmamba or decoder_module=mamba, "
                "e.g. {d_state: 16, expand: 2, d_conv: 4, bidirectional: True}"
            )
        if encoder_module == "conmamba" and not normalize_before:
            raise ValueError("normalize_before must be True for the ConMamba encoder")
        if mamba_decoder and num_encoder_layers == 0:
            raise ValueError("the Mamba decoder needs an encoder (num_encoder_layers > 0)")
        if stream_chunk_size is not None and stream_chunk_size < 1:
            raise ValueError(f"stream_chunk_size must be at least 1; got {stream_chunk_size}")
        if stream_chunk_size is None and stream_left_context is not None:
            raise ValueError("stream_left_context needs stream_chunk_size")
        if stream_left_context is not None and stream_left_context < 0:
            raise ValueError(f"stream_left_context must be >= 0; got {stream_left_context}")
        self.mamba_init = mamba_init
        # SpeechBrain builds its own encoders and the Transformer decoder; for ConMamba it
        # builds no encoder, and for the Mamba decoder it is told there is none.
        super().__init__(
            tgt_vocab=tgt_vocab, input_size=input_size, d_model=d_model, nhead=nhead,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=0 if mamba_decoder else num_decoder_layers,
            d_ffn=d_ffn, dropout=dropout, activation=activation,
            positional_encoding=positional_encoding, normalize_before=normalize_before,
            kernel_size=kernel_size, bias=bias, encoder_module=encoder_module,
            conformer_activation=conformer_activation,
            branchformer_activation=branchformer_activation, attention_type=attention_type,
            max_length=max_length, causal=causal, csgu_linear_units=csgu_linear_units,
            gate_activation=gate_activation, use_linear_after_conv=use_linear_after_conv,
            output_hidden_states=output_hidden_states, layerdrop_prob=layerdrop_prob,
        )
        self.encoder_module = encoder_module
        self.decoder_module = decoder_module
        if encoder_module == "conmamba" and num_encoder_layers > 0:
            self.encoder = ConmambaEncoder(
                num_layers=num_encoder_layers, d_model=d_model, d_ffn=d_ffn,
                kernel_size=kernel_size, activation=branchformer_activation, bias=bias,
                dropout=dropout, causal=self.causal, mamba_config=mamba_config,
                output_hidden_states=output_hidden_states,
            )
        if mamba_decoder:
            self.num_decoder_layers = num_decoder_layers
            self.custom_tgt_module = ModuleList(NormalizedEmbedding(d_model, tgt_vocab))
            self.decoder = MambaDecoder(
                num_layers=num_decoder_layers, d_model=d_model, d_ffn=d_ffn,
                activation=activation, dropout=dropout, normalize_before=normalize_before,
                mamba_config=mamba_config,
            )
        self.stream_chunk_size = stream_chunk_size
        self.stream_left_context = stream_left_context
        self._init_params()
        self.register_load_state_dict_pre_hook(_fill_constant_buffers)

    @property
    def streaming_config(self) -> DynChunkTrainConfig | None:
        """The streaming chunk configuration (chunk size in encoder frames, left context in
        chunks; None: unlimited), or None when the model has none."""
        if self.stream_chunk_size is None:
            return None
        return DynChunkTrainConfig(self.stream_chunk_size, self.stream_left_context)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor | None,
        wav_len: Tensor | None = None,
        pad_idx: int = 0,
        dynchunktrain_config: DynChunkTrainConfig | None = None,
    ) -> Any:
        """SpeechBrain's ``forward``; with ``dynchunktrain_config`` (encoder only: ``tgt`` None)
        src (B, L, F) -> (encoder_out (B, L, d_model), None) encoded with chunked attention
        and Dynamic Chunk Convolution, as ``encode(..., dynchunktrain_config=...)``."""
        if dynchunktrain_config is None:
            return super().forward(src, tgt, wav_len, pad_idx)
        if tgt is not None:
            raise ValueError("dynchunktrain_config is supported by the encoder-only forward "
                             "(tgt=None)")
        if self.output_hidden_states:
            encoder_out, hidden_states = self.encode(src, wav_len, pad_idx, dynchunktrain_config)
            return encoder_out, None, hidden_states
        return self.encode(src, wav_len, pad_idx, dynchunktrain_config), None

    def _init_params(self) -> None:
        """Xavier-normal for every parameter with more than one dimension (see ``mamba_init``)."""
        keep: set[int] = set()
        if getattr(self, "mamba_init", "xavier") == "mamba":
            keep = {id(p) for m in self.modules() if isinstance(m, Mamba) for p in m.parameters()}
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in keep:
                nn.init.xavier_normal_(p)

    # ------------------------------------------------------------------ incremental decoding

    def _check_mamba_decoder(self) -> MambaDecoder:
        if not isinstance(getattr(self, "decoder", None), MambaDecoder):
            raise ValueError("incremental decoding needs decoder_module='mamba'")
        return self.decoder

    def init_decoder_state(
        self, encoder_out: Tensor, enc_len: Tensor | None = None
    ) -> DecoderState:
        """encoder_out (B, S, D), enc_len (B,) absolute lengths -> Mamba decoder state."""
        decoder = self._check_mamba_decoder()
        if enc_len is not None:
            enc_len = torch.round(torch.as_tensor(enc_len, dtype=torch.float)).long()
            if bool((enc_len >= encoder_out.shape[1]).all()):
                enc_len = None
        return decoder.init_state(encoder_out, enc_len)

    @torch.no_grad()
    def decode_step(
        self, tokens: Tensor, position: int, state: DecoderState
    ) -> tuple[Tensor, DecoderState]:
        """tokens (B,) at target position ``position`` -> decoder output (B, 1, D), new state.

        Equals ``decode`` of the whole prefix at its last position.
        """
        decoder = self._check_mamba_decoder()
        tgt = self.custom_tgt_module(tokens.unsqueeze(1))  # (B, 1, D)
        table = self.decoder_position_table()
        if table is not None:
            tgt = tgt + table[:, position : position + 1].to(tgt.dtype)
        return decoder.step(tgt, state)

    def decoder_position_table(self) -> Tensor | None:
        """(1, max_length, D): the absolute positional encodings ``decode`` adds to the
        target embeddings, or None when it adds none."""
        pos = getattr(self, "positional_encoding_decoder", None)
        if pos is None and self.positional_encoding_type == "fixed_abs_sine":
            pos = self.positional_encoding
        return None if pos is None else pos.pe

    @staticmethod
    def reorder_decoder_state(state: DecoderState, index: Tensor) -> DecoderState:
        """Select/reorder the items of a decoder state (beam search): index (B',)."""
        return MambaDecoder.reorder_state(state, index)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _fill_constant_buffers(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state pre-hook: add missing positional-encoding tables (``pe``, ``inv_freq``).

    They are functions of ``d_model`` only, and SpeechBrain versions differ in which of them a
    checkpoint holds; parameters stay strictly checked.
    """
    for name, buffer in module.named_buffers():
        if name.startswith("positional_encoding") and prefix + name not in state_dict:
            state_dict[prefix + name] = buffer.detach().clone()
