"""ConMamba encoder and Mamba decoder (Jiang et al. 2024), padding-aware.

Module and parameter names follow xi-j/Mamba-ASR so its checkpoints load strictly:

* :class:`ConmambaEncoderLayer`: ``x + 1/2 FFN(x)`` -> ``x + Mamba(LayerNorm(x))`` (bidirectional
  "v2", or unidirectional when causal) -> ``x + ConvModule(x)`` -> ``LayerNorm(x + 1/2 FFN(x))``,
  i.e. a Conformer block with the self-attention replaced by (bi)Mamba. Submodules
  ``ffn_module1``, ``mamba``, ``convolution_module``, ``ffn_module2``, ``norm1``, ``norm2``.
* :class:`ConmambaEncoder`: ``layers`` then ``norm`` (LayerNorm, eps 1e-6). A causal one
  streams: :meth:`ConmambaEncoder.forward_chunk` continues from the state after the frames
  before, at a constant cost per frame.
* :class:`MambaDecoderLayer`: ``self_mamba`` over the target, ``cross_mamba`` over memory
  followed by the target (keeping the target's outputs), ``pos_ffn``; ``norm1..3`` before
  (``normalize_before``) or after each residual block.
* :class:`MambaDecoder`: ``layers`` then ``norm``; :meth:`MambaDecoder.init_state` and
  :meth:`MambaDecoder.step` decode one token at a time from cached per-layer states.

Unlike upstream, padding never leaks into valid frames: the Mamba blocks take each item's
length (from SpeechBrain's key padding masks, True on padding, padding at the end), the
convolution module zeros padded frames before its depthwise convolution, and the decoder's
cross_mamba sees each item's valid memory directly followed by its target.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from speechbrain.lobes.models.transformer.Conformer import (
    ConvolutionModule as ConformerConvolutionModule,
)
from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.normalization import LayerNorm
from torch import Tensor, nn

from modules.mamba.bimamba import Mamba, MambaState, length_mask

__all__ = [
    "ConmambaEncoder",
    "ConmambaEncoderLayer",
    "ConvolutionModule",
    "MambaDecoder",
    "MambaDecoderLayer",
    "build_mamba",
    "lengths_from_padding_mask",
]


def lengths_from_padding_mask(mask: Tensor | None) -> Tensor | None:
    """Key padding mask (B, L), True on padding -> valid lengths (B,), or None if no padding.

    While ``torch.export`` traces (no values to test), a mask always gives lengths.
    """
    if mask is None:
        return None
    if not torch.compiler.is_exporting() and not bool(mask.any()):
        return None
    return (~mask).sum(dim=1)


def build_mamba(d_model: int, mamba_config: dict[str, Any] | None, bidirectional: bool) -> Mamba:
    """A Mamba block from upstream's ``mamba_config`` (d_state, expand, d_conv, ...).

    The ``bidirectional`` key of the config is ignored here; the caller decides.
    """
    if mamba_config is None:
        raise ValueError("mamba_config is required, e.g. {d_state: 16, expand: 2, d_conv: 4}")
    config = {k: v for k, v in mamba_config.items() if k != "bidirectional"}
    return Mamba(d_model=d_model, bimamba_type="v2" if bidirectional else "none", **config)


class ConvolutionModule(ConformerConvolutionModule):
    """SpeechBrain's Conformer convolution module with padding zeroed before the depthwise conv.

    x: (B, L, D), mask: (B, L, 1) True on padding -> (B, L, D); padded output frames are zero.
    Parameters as SpeechBrain's (``layer_norm``, ``bottleneck``, ``conv``, ``after_conv``).
    """

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dynchunktrain_config: Any = None
    ) -> Tensor:
        if dynchunktrain_config is not None:
            raise NotImplementedError("dynamic chunk training is not supported by ConMamba")
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (B, D, L)
        if mask is not None:
            out = out.masked_fill(mask.transpose(1, 2), 0.0)
        out = self.conv(out)
        if self.causal:
            out = out[..., : -self.padding]
        out = self.after_conv(out.transpose(1, 2))  # (B, L, D)
        if mask is not None:
            out = out.masked_fill(mask, 0.0)
        return out

    def initial_state(self, batch: int, like: Tensor) -> Tensor:
        """The zero history before a stream's first frame: (B, D, kernel_size - 1)."""
        width = self.conv.dilation[0] * (self.conv.kernel_size[0] - 1)
        return like.new_zeros(batch, self.conv.in_channels, width)

    def forward_chunk(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """The next frames of a stream (causal modules only): x (B, L, D), history
        (B, D, kernel_size - 1) -> (B, L, D), the new history. Equals :meth:`forward` on the
        whole sequence at those frames."""
        if not self.causal:
            raise ValueError("forward_chunk needs a causal convolution module")
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (B, D, L)
        full = torch.cat([history.to(out.dtype), out], dim=-1)  # (B, D, K - 1 + L)
        conv = self.conv
        out = F.conv1d(full, conv.weight, conv.bias, dilation=conv.dilation, groups=conv.groups)
        return self.after_conv(out.transpose(1, 2)), full[..., full.shape[-1] - history.shape[-1]:]


def _feed_forward(d_model: int, d_ffn: int, dropout: float, activation: type) -> nn.Sequential:
    """Pre-norm position-wise feed-forward: LayerNorm -> FFN -> Dropout."""
    return nn.Sequential(
        nn.LayerNorm(d_model),
        PositionalwiseFeedForward(
            d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation
        ),
        nn.Dropout(dropout),
    )


# A causal encoder layer's stream state: its Mamba's and its convolution module's history.
LayerState = tuple[MambaState, Tensor]
EncoderState = list[LayerState]


class ConmambaEncoderLayer(nn.Module):
    """Conformer block with (bi)Mamba instead of self-attention: (B, L, D) -> (B, L, D)."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        kernel_size: int = 31,
        activation: type = nn.GELU,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        mamba_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        bidirectional = bool((mamba_config or {}).get("bidirectional", True)) and not causal
        self.mamba = build_mamba(d_model, mamba_config, bidirectional)
        self.convolution_module = ConvolutionModule(
            d_model, kernel_size, bias, activation, dropout, causal=causal
        )
        self.ffn_module1 = _feed_forward(d_model, d_ffn, dropout, activation)
        self.ffn_module2 = _feed_forward(d_model, d_ffn, dropout, activation)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        pos_embs: Tensor | None = None,
        dynchunktrain_config: Any = None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        """x (B, L, D), key padding mask (B, L) True on padding -> (B, L, D).

        ``src_mask`` and ``pos_embs`` are accepted for the encoder interface and unused.
        ``lengths`` (B,) may be given instead of the mask.
        """
        if lengths is None:
            lengths = lengths_from_padding_mask(src_key_padding_mask)
        conv_mask = None
        if lengths is not None:
            conv_mask = ~length_mask(lengths, x.shape[1]).unsqueeze(-1)  # (B, L, 1)
        x = x + 0.5 * self.ffn_module1(x)
        x = x + self.mamba(self.norm1(x), lengths)
        x = x + self.convolution_module(x, conv_mask, dynchunktrain_config=dynchunktrain_config)
        return self.norm2(x + 0.5 * self.ffn_module2(x))

    def initial_state(self, batch: int, like: Tensor) -> LayerState:
        """A causal layer's state before a stream's first frame."""
        return (self.mamba.initial_state(batch, like.device),
                self.convolution_module.initial_state(batch, like))

    def forward_chunk(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """The next frames of a stream (causal layers only): (B, L, D), state -> (B, L, D),
        the new state; equals :meth:`forward` on the whole sequence at those frames."""
        mamba_state, conv_state = state
        x = x + 0.5 * self.ffn_module1(x)
        out, mamba_state = self.mamba.forward_chunk(self.norm1(x), mamba_state)
        x = x + out
        out, conv_state = self.convolution_module.forward_chunk(x, conv_state)
        x = x + out
        return self.norm2(x + 0.5 * self.ffn_module2(x)), (mamba_state, conv_state)


class ConmambaEncoder(nn.Module):
    """Stack of :class:`ConmambaEncoderLayer` and a final LayerNorm: (B, L, D) -> (B, L, D)."""

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        d_ffn: int,
        kernel_size: int = 31,
        activation: type = nn.GELU,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        mamba_config: dict[str, Any] | None = None,
        output_hidden_states: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ConmambaEncoderLayer(
                d_model=d_model, d_ffn=d_ffn, kernel_size=kernel_size, activation=activation,
                bias=bias, dropout=dropout, causal=causal, mamba_config=mamba_config,
            )
            for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model, eps=1e-6)
        self.output_hidden_states = output_hidden_states

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        pos_embs: Tensor | None = None,
        dynchunktrain_config: Any = None,
    ) -> tuple:
        """src (B, L, D), key padding mask (B, L) True on padding -> ((B, L, D), None).

        With ``output_hidden_states`` a third element lists the input and every layer's
        output, as SpeechBrain's encoders do.
        """
        lengths = lengths_from_padding_mask(src_key_padding_mask)
        output, hidden = src, [src]
        for layer in self.layers:
            output = layer(output, dynchunktrain_config=dynchunktrain_config, lengths=lengths)
            hidden.append(output)
        output = self.norm(output)
        if self.output_hidden_states:
            return output, None, hidden
        return output, None

    @property
    def causal(self) -> bool:
        """Whether every layer sees past frames only (then it can stream)."""
        return all(
            layer.mamba.bimamba_type == "none" and layer.convolution_module.causal
            for layer in self.layers
        )

    def initial_state(self, batch: int, like: Tensor) -> EncoderState:
        """Every layer's state before a stream's first frame (causal encoders only)."""
        if not self.causal:
            raise ValueError("only a causal ConMamba encoder streams (unidirectional Mamba, "
                             "causal convolution module)")
        return [layer.initial_state(batch, like) for layer in self.layers]

    @torch.no_grad()
    def forward_chunk(self, src: Tensor, state: EncoderState) -> tuple[Tensor, EncoderState]:
        """The next frames of a stream: src (B, L, D), state -> (B, L, D), the new state.

        Equals :meth:`forward` on the whole sequence at those frames, at a cost that does not
        grow with the frames before: each layer carries its Mamba state (last convolution
        inputs, SSM state) and its convolution module's last ``kernel_size - 1`` inputs.
        """
        new_state = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            src, layer_state = layer.forward_chunk(src, layer_state)
            new_state.append(layer_state)
        return self.norm(src), new_state


def pack_memory_target(
    memory: Tensor, target: Tensor, memory_lengths: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Place each item's target right after its valid memory.

    memory (B, S, D), target (B, T, D), lengths (B,) -> packed (B, S + T, D) with padding at the
    end, the packed lengths (B,) and index (B, T) of the target frames in ``packed`` (None, None
    when no memory is padded: then packed is the plain concatenation).
    """
    if memory_lengths is None:
        return torch.cat([memory, target], dim=1), None, None
    batch, mem_len, _ = memory.shape
    tgt_len = target.shape[1]
    lens = memory_lengths.to(memory.device).unsqueeze(1)  # (B, 1)
    p = torch.arange(mem_len + tgt_len, device=memory.device).unsqueeze(0)  # (1, S + T)
    # Source row in cat([memory, target, zero]): memory p, target S + p - len, zero S + T.
    index = torch.where(p < lens, p, torch.where(p < lens + tgt_len, mem_len + p - lens,
                                                 mem_len + tgt_len))
    zero = memory.new_zeros(batch, 1, memory.shape[2])
    rows = torch.cat([memory, target.to(memory.dtype), zero], dim=1)
    packed = rows.gather(1, index.unsqueeze(-1).expand(-1, -1, memory.shape[2]))
    target_index = lens + torch.arange(tgt_len, device=memory.device)  # (B, T)
    return packed, memory_lengths + tgt_len, target_index


class MambaDecoderLayer(nn.Module):
    """Mamba over the target, Mamba over memory + target, FFN: (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        activation: type = nn.ReLU,
        dropout: float = 0.0,
        normalize_before: bool = False,
        mamba_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.self_mamba = build_mamba(d_model, mamba_config, bidirectional=False)
        self.cross_mamba = build_mamba(d_model, mamba_config, bidirectional=False)
        self.pos_ffn = PositionalwiseFeedForward(
            d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation
        )
        self.norm1 = LayerNorm(d_model, eps=1e-6)
        self.norm2 = LayerNorm(d_model, eps=1e-6)
        self.norm3 = LayerNorm(d_model, eps=1e-6)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _residual(self, x: Tensor, norm: nn.Module, drop: nn.Module, fn: Any) -> Tensor:
        """x + drop(fn(x')), x' = norm(x) before (pre-norm) or the sum normed after."""
        if self.normalize_before:
            return x + drop(fn(norm(x)))
        return norm(x + drop(fn(x)))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        pos_embs_tgt: Tensor | None = None,
        pos_embs_src: Tensor | None = None,
        memory_lengths: Tensor | None = None,
    ) -> tuple[Tensor, None, None]:
        """tgt (B, T, D), memory (B, S, D), memory padding mask (B, S) -> ((B, T, D), None, None).

        The masks other than ``memory_key_padding_mask`` are accepted for SpeechBrain's decoder
        interface and unused: Mamba is causal, and target padding is at the end.
        """
        if memory_lengths is None:
            memory_lengths = lengths_from_padding_mask(memory_key_padding_mask)

        def cross(x: Tensor) -> Tensor:
            packed, lengths, index = pack_memory_target(memory, x, memory_lengths)
            out = self.cross_mamba(packed, lengths)  # (B, S + T, D)
            if index is None:
                return out[:, memory.shape[1] :]
            return out.gather(1, index.unsqueeze(-1).expand(-1, -1, out.shape[2]))

        tgt = self._residual(tgt, self.norm1, self.dropout1, self.self_mamba)
        tgt = self._residual(tgt, self.norm2, self.dropout2, cross)
        tgt = self._residual(tgt, self.norm3, self.dropout3, self.pos_ffn)
        return tgt, None, None

    def step(
        self, tgt: Tensor, state: tuple[MambaState, MambaState]
    ) -> tuple[Tensor, tuple[MambaState, MambaState]]:
        """One target frame: (B, 1, D), (self state, cross state) -> (B, 1, D), new states."""
        self_state, cross_state = state
        new: dict[str, MambaState] = {}

        def self_fn(x: Tensor) -> Tensor:
            out, new["self"] = self.self_mamba.step(x, self_state)
            return out

        def cross_fn(x: Tensor) -> Tensor:
            out, new["cross"] = self.cross_mamba.step(x, cross_state)
            return out

        tgt = self._residual(tgt, self.norm1, self.dropout1, self_fn)
        tgt = self._residual(tgt, self.norm2, self.dropout2, cross_fn)
        tgt = self._residual(tgt, self.norm3, self.dropout3, self.pos_ffn)
        return tgt, (new["self"], new["cross"])


DecoderState = list[tuple[MambaState, MambaState]]


class MambaDecoder(nn.Module):
    """Stack of :class:`MambaDecoderLayer` and a final LayerNorm (eps 1e-6)."""

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        d_ffn: int,
        activation: type = nn.ReLU,
        dropout: float = 0.0,
        normalize_before: bool = False,
        mamba_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MambaDecoderLayer(
                d_model=d_model, d_ffn=d_ffn, activation=activation, dropout=dropout,
                normalize_before=normalize_before, mamba_config=mamba_config,
            )
            for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model, eps=1e-6)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        pos_embs_tgt: Tensor | None = None,
        pos_embs_src: Tensor | None = None,
    ) -> tuple[Tensor, list[None], list[None]]:
        """tgt (B, T, D), memory (B, S, D) -> ((B, T, D), [None], [None]) as SpeechBrain's."""
        lengths = lengths_from_padding_mask(memory_key_padding_mask)
        output = tgt
        for layer in self.layers:
            output, _, _ = layer(output, memory, memory_lengths=lengths)
        return self.norm(output), [None], [None]

    @torch.no_grad()
    def init_state(self, memory: Tensor, memory_lengths: Tensor | None = None) -> DecoderState:
        """memory (B, S, D), lengths (B,) -> per-layer states before the first target frame.

        Each layer's cross_mamba consumes the item's valid memory once; its self_mamba starts
        from zeros.
        """
        states = []
        for layer in self.layers:
            _, cross = layer.cross_mamba(memory, memory_lengths, return_state=True)
            states.append((layer.self_mamba.initial_state(memory.shape[0], memory.device), cross))
        return states

    @torch.no_grad()
    def step(self, tgt: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """One target frame for every item: (B, 1, D), states -> (B, 1, D), new states.

        Same result as :meth:`forward` on the whole prefix, at a cost independent of its length.
        """
        new_state = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            tgt, layer_state = layer.step(tgt, layer_state)
            new_state.append(layer_state)
        return self.norm(tgt), new_state

    @staticmethod
    def reorder_state(state: DecoderState, index: Tensor) -> DecoderState:
        """Select/reorder batch items of every layer's states (beam search): index (B',)."""
        return [(s.index_select(index), c.index_select(index)) for s, c in state]
