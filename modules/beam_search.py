"""Beam search for the Mamba decoder from cached per-layer states.

SpeechBrain's ``S2STransformerBeamSearcher`` calls ``model.decode`` on the whole prefix at
every step (the cost of a step grows with its length). :class:`S2SMambaBeamSearcher` keeps
each hypothesis' Mamba decoder state instead (every layer's convolution and SSM state, see
:meth:`modules.TransformerASR.TransformerASR.decode_step`), reorders it with the beams in
``permute_mem`` and feeds one token per step, so a step costs the same at token 5 and 500.
Everything else (CTC prefix scoring, LM fusion, length normalisation, ...) is SpeechBrain's
``S2SBeamSearcher``; use it in YAML exactly like ``S2STransformerBeamSearcher``::

    test_search: !new:modules.beam_search.S2SMambaBeamSearcher
        modules: [!ref <Transformer>, !ref <seq_lin>]
        bos_index: !ref <bos_index>
        ...
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher
from torch import Tensor

from modules.Conmamba import DecoderState

__all__ = ["MambaSearchMemory", "S2SMambaBeamSearcher"]


class MambaSearchMemory(NamedTuple):
    """Decoder memory of a beam search: next target position and per-layer states."""

    position: int
    state: DecoderState | None


class S2SMambaBeamSearcher(S2STransformerBeamSearcher):
    """S2S beam search stepping a Mamba-decoder ``TransformerASR`` from cached states.

    ``modules``: [TransformerASR with ``decoder_module="mamba"``, output Linear]; other
    arguments as SpeechBrain's ``S2STransformerBeamSearcher``.
    """

    def reset_mem(self, batch_size: int, device: torch.device) -> MambaSearchMemory:
        """Empty memory; the states are built from the encoder output at the first step."""
        return MambaSearchMemory(0, None)

    def permute_mem(self, memory: MambaSearchMemory, index: Tensor) -> MambaSearchMemory:
        """Follow the surviving beams: index (B * beam,) of each new hypothesis' parent."""
        if memory.state is None:
            return memory
        return MambaSearchMemory(
            memory.position, self.model.reorder_decoder_state(memory.state, index)
        )

    def forward_step(
        self, inp_tokens: Tensor, memory: MambaSearchMemory, enc_states: Tensor, enc_lens: Tensor
    ) -> tuple[Tensor, MambaSearchMemory, None]:
        """tokens (B * beam,) -> log-probabilities (B * beam, vocab), new memory, no attention."""
        state = memory.state
        if state is None:
            state = self.model.init_decoder_state(enc_states, enc_lens)
        pred, state = self.model.decode_step(inp_tokens, memory.position, state)
        log_probs = self.softmax(self.fc(pred) / self.temperature)  # (B * beam, 1, vocab)
        return log_probs[:, -1, :], MambaSearchMemory(memory.position + 1, state), None
