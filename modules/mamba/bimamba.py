"""Mamba block (selective SSM), unidirectional or bidirectional ("v2"), padding-aware.

The constructor arguments and parameter names are mamba-ssm's ``Mamba`` (``in_proj``,
``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) plus the bidirectional
"v2" extension of Vim / xi-j/Mamba-ASR (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``,
``D_b``; input and output projections shared), so their checkpoints load strictly.

One direction, for input (B, L, D)::

    x, z  = in_proj(u).chunk(2)                 # (B, Di, L) each, Di = expand * D
    x     = silu(causal_conv1d(x))              # depthwise, kernel d_conv
    dt, B, C = x_proj(x).split(dt_rank, N, N)
    y     = selective_scan(x, dt_proj.weight @ dt, -exp(A_log), B, C, D, z,
                           delta_bias=dt_proj.bias, delta_softplus=True)
    out   = out_proj(y)

"v2" runs a second direction with its own convolution, projections and SSM over the
time-reversed sequence and combines ``out_proj(0.5 * fwd + 0.5 * flip(bwd))``
(``if_devide_out=True``, upstream's default) or ``out_proj(fwd + flip(bwd))``.

Padding. ``forward(x, lengths)`` takes each item's number of valid frames; padding is assumed
at the end. The forward direction is causal, so padding at the end cannot reach valid frames;
the reverse direction reverses only each item's valid frames (its scan starts at the item's
last valid frame, not on the padding). Valid outputs therefore equal the item's output when
run alone, and padded output frames are zero. ``return_state=True`` also returns each item's
:class:`MambaState` after its last valid frame (the SSM is frozen over padding by a zero step
size), from which :meth:`Mamba.step` continues one frame at a time at a constant cost.

The kernels come from :mod:`modules.mamba.selective_scan_interface`: mamba-ssm /
causal-conv1d on CUDA when installed, the pure-PyTorch scan otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.mamba.selective_scan_interface import causal_conv1d_fn, selective_scan_fn

__all__ = ["Mamba", "MambaState", "flip_valid", "length_mask"]

# A stream's chunks of at most this many frames are scanned in closed form (Mamba.forward_chunk).
SHORT_CHUNK = 8


class MambaState(NamedTuple):
    """Recurrent state of one Mamba direction after some frames.

    conv: (B, Di, d_conv) the last ``d_conv`` convolution inputs (zeros before the start).
    ssm: (B, Di, N) the SSM state, float32.
    """

    conv: Tensor
    ssm: Tensor

    def index_select(self, index: Tensor) -> MambaState:
        """Reorder/select batch items (beam search): index (B',) -> state of B' items."""
        return MambaState(self.conv.index_select(0, index), self.ssm.index_select(0, index))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """SSM states are float32, or float64 for float64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths (B,) -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)


def flip_valid(x: Tensor, lengths: Tensor | None) -> Tensor:
    """(B, C, L) -> (B, C, L): reverse each item's first ``lengths[b]`` frames in place of them.

    Padding frames stay where they are. The map is its own inverse.
    """
    if lengths is None:
        return x.flip(-1)
    length = x.shape[-1]
    t = torch.arange(length, device=x.device)
    lens = lengths.to(x.device).unsqueeze(1)  # (B, 1)
    index = torch.where(t < lens, lens - 1 - t, t)  # (B, L)
    return x.gather(-1, index.unsqueeze(1).expand_as(x))


class Mamba(nn.Module):
    """Selective state-space block: (B, L, d_model) -> (B, L, d_model).

    Arguments follow mamba-ssm's ``Mamba``; ``bimamba_type`` is "none" (unidirectional) or
    "v2" (bidirectional), ``if_devide_out`` halves the sum of the two directions (v2 only),
    ``init_layer_scale`` adds a learnt per-channel output scale ``gamma``. ``use_fast_path``
    and ``layer_idx`` are accepted for compatibility: the kernels are chosen by the dispatcher
    of :mod:`modules.mamba.selective_scan_interface`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        bimamba_type: str = "none",
        if_devide_out: bool = True,
        init_layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if bimamba_type not in ("none", "v2"):
            raise ValueError(f"bimamba_type must be 'none' or 'v2'; got {bimamba_type!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant'; got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.if_devide_out = if_devide_out
        self.init_layer_scale = init_layer_scale
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, device=device))

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        dt_args = (dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        self.conv1d, self.x_proj, self.dt_proj = self._direction(conv_bias, factory, dt_args)
        self.A_log = nn.Parameter(self._s4d_real_log(device))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        if bimamba_type == "v2":
            self.A_b_log = nn.Parameter(self._s4d_real_log(device))
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._direction(
                conv_bias, factory, dt_args
            )
            self.D_b = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        for name in ("A_log", "D", "A_b_log", "D_b"):
            if hasattr(self, name):
                getattr(self, name)._no_weight_decay = True

    # ------------------------------------------------------------------ construction

    def _direction(
        self, conv_bias: bool, factory: dict, dt_args: tuple
    ) -> tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        """One direction's depthwise conv, x projection and dt projection, mamba-ssm init."""
        conv = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
            padding=self.d_conv - 1, bias=conv_bias, **factory,
        )
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        dt_init, dt_scale, dt_min, dt_max, dt_floor = dt_args
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                dt_proj.weight.fill_(std)
            else:
                dt_proj.weight.uniform_(-std, std)
            # Bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
            dt = torch.exp(
                torch.rand(self.d_inner, device=dt_proj.bias.device)
                * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True
        return conv, x_proj, dt_proj

    def _s4d_real_log(self, device: torch.device | str | None) -> Tensor:
        """(Di, N) log of the S4D-real initialisation A[d, n] = n + 1, kept in float32."""
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        return torch.log(a).repeat(self.d_inner, 1).contiguous()

    def _params(self, reverse: bool) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, Tensor, Tensor]:
        """(conv1d, x_proj, dt_proj, A_log, D) of the forward or the reverse direction."""
        if reverse:
            return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    # ------------------------------------------------------------------ full sequence

    def _scan(
        self,
        xz: Tensor,
        reverse: bool,
        lengths: Tensor | None,
        valid: Tensor | None,
        return_state: bool,
    ) -> tuple[Tensor, MambaState | None]:
        """xz (B, 2Di, L) -> y (B, Di, L) [, state after each item's last valid frame]."""
        conv, x_proj, dt_proj, a_log, d_skip = self._params(reverse)
        x, z = xz.chunk(2, dim=1)  # (B, Di, L) each
        state_conv = None
        if return_state:
            state_conv = self._last_inputs(x, lengths)
        x = causal_conv1d_fn(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (B, L, r + 2N)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, Di, L)
        b = b.transpose(1, 2).contiguous()  # (B, N, L)
        c = c.transpose(1, 2).contiguous()  # (B, N, L)
        a = -torch.exp(a_log.float())  # (Di, N)
        delta_bias, softplus = dt_proj.bias.float(), True
        if return_state and valid is not None:
            # Zero step size on padding: exp(0 * A) = 1 and no input, so the final state is
            # the state after each item's last valid frame.
            delta = F.softplus(delta.float() + delta_bias.unsqueeze(-1))
            delta = (delta * valid.unsqueeze(1)).to(x.dtype)  # kernels want u's dtype
            delta_bias, softplus = None, False
        out = selective_scan_fn(
            x, delta, a, b, c, d_skip.float(), z=z, delta_bias=delta_bias,
            delta_softplus=softplus, return_last_state=return_state,
        )
        if not return_state:
            return out, None
        y, ssm = out
        return y, MambaState(state_conv, ssm.to(_state_dtype(y.dtype)))

    def _last_inputs(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """x (B, Di, L) -> (B, Di, d_conv): the last d_conv inputs of each item, zero-filled."""
        length = x.shape[-1]
        if lengths is None:
            return F.pad(x, (self.d_conv - length, 0))  # crops when length > d_conv
        offsets = torch.arange(-self.d_conv, 0, device=x.device)
        index = lengths.to(x.device).unsqueeze(1) + offsets  # (B, d_conv)
        padded = F.pad(x, (0, 1))  # index -1 -> the zero column at the end
        index = torch.where(index < 0, length, index)
        return padded.gather(-1, index.unsqueeze(1).expand(-1, x.shape[1], -1))

    def forward(
        self,
        hidden_states: Tensor,
        lengths: Tensor | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, MambaState]:
        """(B, L, D), lengths (B,) valid frames -> (B, L, D) [, MambaState].

        Padded output frames are zero. ``return_state`` (unidirectional only) also returns
        the state after each item's last valid frame, for :meth:`step`.
        """
        batch, length, _ = hidden_states.shape
        if return_state and self.bimamba_type != "none":
            raise ValueError("return_state needs a unidirectional Mamba (bimamba_type='none')")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=hidden_states.device).long()
            # Checks and shortcut read the values: eager only (an exported graph has none)
            if not torch.compiler.is_exporting():
                if lengths.shape != (batch,) or bool((lengths < 0).any()
                                                     | (lengths > length).any()):
                    raise ValueError(
                        f"lengths must be ({batch},) ints in [0, {length}]; got {lengths.tolist()}"
                    )
                if bool((lengths == length).all()):
                    lengths = None
        valid = None if lengths is None else length_mask(lengths, length)  # (B, L)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2Di, L)
        y, state = self._scan(xz, False, lengths, valid, return_state)
        if self.bimamba_type == "v2":
            y_b, _ = self._scan(flip_valid(xz, lengths), True, lengths, valid, False)
            y_b = flip_valid(y_b, lengths)
            y = 0.5 * y + 0.5 * y_b if self.if_devide_out else y + y_b
        out = self.out_proj(y.transpose(1, 2))  # (B, L, D)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        if valid is not None:
            out = out * valid.unsqueeze(-1).to(out.dtype)
        return (out, state) if return_state else out

    # ------------------------------------------------------------------ streaming

    def forward_chunk(
        self, hidden_states: Tensor, state: MambaState
    ) -> tuple[Tensor, MambaState]:
        """The next frames of a stream: (B, L, D), state -> (B, L, D), the state after them
        (unidirectional only).

        Equals :meth:`forward` on the whole sequence at those frames: the convolution sees the
        state's last inputs, and the scan from a zero state is corrected by the carried state,
        which decays as ``exp(A * cumsum(delta))`` (the scan is linear in its state).
        """
        if self.bimamba_type != "none":
            raise ValueError("forward_chunk needs a unidirectional Mamba (bimamba_type='none')")
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2Di, L)
        x, z = xz.chunk(2, dim=1)  # (B, Di, L) each
        history = torch.cat([state.conv.to(x.dtype), x], dim=-1)  # (B, Di, d_conv + L)
        # (B, Di, L): each output sees its d_conv real inputs, so no padding
        x = F.silu(F.conv1d(history[..., 1:], self.conv1d.weight, self.conv1d.bias,
                            groups=self.d_inner))
        x_dbl = F.linear(x.transpose(1, 2), self.x_proj.weight)  # (B, L, r + 2N)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        f = state.ssm.dtype
        delta = F.softplus(
            F.linear(dt, self.dt_proj.weight).transpose(1, 2).to(f)
            + self.dt_proj.bias.to(f).unsqueeze(-1)
        )  # (B, Di, L)
        b = b.transpose(1, 2).contiguous()  # (B, N, L)
        c = c.transpose(1, 2).contiguous()  # (B, N, L)
        a = -torch.exp(self.A_log.to(f))  # (Di, N)
        if length <= SHORT_CHUNK:
            y, ssm = self._short_scan(x.to(f), delta, a, b.to(f), c.to(f), z, state.ssm)
        else:
            y, ssm = selective_scan_fn(
                x, delta.to(x.dtype), a, b, c, self.D.to(f), z=z, return_last_state=True
            )
            # The carried state's part: h0 decayed to each frame, read out by C, gated by z.
            decay = torch.exp(delta.cumsum(-1).unsqueeze(2) * a.unsqueeze(-1))  # (B, Di, N, L)
            carried = decay * state.ssm.unsqueeze(-1)
            y = y + (torch.einsum("bdnl,bnl->bdl", carried, c.to(f))
                     * F.silu(z.to(f))).to(y.dtype)
            ssm = ssm.to(f) + carried[..., -1]
        out = self.out_proj(y.to(hidden_states.dtype).transpose(1, 2))  # (B, L, D)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        conv = history[..., -self.d_conv:] if length else state.conv
        return out, MambaState(conv, ssm)

    def _short_scan(
        self, u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, z: Tensor, h0: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The scan of a few frames from state ``h0`` in closed form (a handful of tensor
        operations instead of a scan's dozens, which dominate at a stream's chunk sizes).

        u, delta, z (B, Di, L), a (Di, N), b, c (B, N, L), h0 (B, Di, N) -> y (B, Di, L), the
        last state: ``h_t = exp(A S_t) h0 + sum_{s<=t} exp(A (S_t - S_s)) delta_s B_s u_s``,
        ``S`` the running sum of delta (each factor <= 1: no overflow).
        """
        length = u.shape[-1]
        cum = (delta.unsqueeze(2) * a.unsqueeze(-1)).cumsum(-1)  # (B, Di, N, L): A S_t
        future = torch.ones(length, length, dtype=torch.bool, device=u.device).triu(1)
        weights = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(future, -math.inf).exp()
        drive = (delta * u).unsqueeze(2) * b.unsqueeze(1)  # (B, Di, N, L)
        h = (weights @ drive.unsqueeze(-1)).squeeze(-1) + cum.exp() * h0.unsqueeze(-1)
        y = (h * c.unsqueeze(1)).sum(2) + self.D.to(u.dtype).unsqueeze(-1) * u
        return y * F.silu(z.to(u.dtype)), h[..., -1]

    # ------------------------------------------------------------------ recurrent steps

    def initial_state(self, batch: int, device: torch.device | None = None) -> MambaState:
        """The state before the first frame: zeros, (B, Di, d_conv) and (B, Di, N)."""
        device = device or self.out_proj.weight.device
        dtype = self.in_proj.weight.dtype
        conv = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, device=device)
        return MambaState(conv, ssm.to(_state_dtype(dtype)))

    def step(self, hidden_states: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One frame: (B, 1, D), state -> (B, 1, D), new state (unidirectional only).

        Costs the same at every position: the state has a fixed size.
        """
        if self.bimamba_type != "none":
            raise ValueError("step needs a unidirectional Mamba (bimamba_type='none')")
        xz = self.in_proj(hidden_states.squeeze(1))  # (B, 2Di)
        x, z = xz.chunk(2, dim=-1)  # (B, Di)
        conv_in = torch.cat([state.conv[..., 1:], x.unsqueeze(-1).to(state.conv.dtype)], -1)
        x = (conv_in * self.conv1d.weight.squeeze(1)).sum(-1)  # (B, Di)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        f = state.ssm.dtype  # float32, float64 for float64 models
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).to(f) + self.dt_proj.bias.to(f))
        a = -torch.exp(self.A_log.to(f))  # (Di, N)
        decay = torch.exp(delta.unsqueeze(-1) * a)  # (B, Di, N)
        drive = (delta * x.to(f)).unsqueeze(-1) * b.to(f).unsqueeze(1)  # (B, Di, N)
        ssm = decay * state.ssm + drive
        y = (ssm * c.to(f).unsqueeze(1)).sum(-1) + self.D.to(f) * x.to(f)  # (B, Di)
        y = (y * F.silu(z.to(f))).to(hidden_states.dtype)
        out = self.out_proj(y)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out.unsqueeze(1), MambaState(conv_in, ssm)
