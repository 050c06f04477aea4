"""Long recordings in one pass: the windowed feature normaliser (modules/normalization.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from speechbrain.processing.features import InputNormalization
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.parameter_transfer import Pretrainer

from modules.normalization import WindowedInputNormalization

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "options", [{}, {"avoid_padding_norm": True}, {"std_norm": False}], ids=str
)
def test_windowed_is_sentence_normalisation_bitwise_up_to_the_window(options: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 50, 8) * 3 + 5
    lengths = torch.tensor([1.0, 0.7, 0.45])  # 50, 35 and 23 valid frames
    sentence = InputNormalization(norm_type="sentence", **options)(x, lengths)
    whole = WindowedInputNormalization(window_frames=50, **options)(x, lengths)
    assert torch.equal(whole, sentence)  # padding frames included
    mixed = WindowedInputNormalization(window_frames=35, **options)(x, lengths)
    assert torch.equal(mixed[1:], sentence[1:])  # rows of at most 35 valid frames
    assert not torch.allclose(mixed[0], sentence[0], atol=1e-3)  # the row of 50 is windowed


@pytest.mark.parametrize(
    "options", [{}, {"avoid_padding_norm": True}, {"std_norm": False}], ids=str
)
def test_long_rows_are_normalised_by_the_window_around_each_frame(options: dict) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1000, 6) + torch.linspace(0, 10, 1000).view(1, -1, 1)  # a drifting mean
    width, valid = 200, (1000, 900)
    out = WindowedInputNormalization(window_frames=width, **options)(
        x, torch.tensor([1.0, 0.9])
    )
    sentence = InputNormalization(norm_type="sentence", **options)
    for row, n_valid in enumerate(valid):
        for t in [*range(0, 1000, 37), 99, 100, 101, 799, 800, 899, 900, 999]:
            start = min(max(t - width // 2, 0), n_valid - width)  # centred, inside the valid part
            if t < n_valid:
                window = sentence(x[row:row + 1, start:start + width], torch.ones(1))
                expected = window[0, t - start]
            elif options.get("avoid_padding_norm"):
                expected = x[row, t]
            else:  # padding frames take the last window's statistics
                window = x[row, start:start + width]
                std = window.std(0, unbiased=False) if options.get("std_norm", True) else 1.0
                expected = (x[row, t] - window.mean(0)) / std
            torch.testing.assert_close(out[row, t], expected, atol=2e-5, rtol=0)
    whole = sentence(x, torch.tensor([1.0, 0.9]))
    assert (out[0] - whole[0]).abs().mean() > 0.5  # the drift is taken out locally


def test_windowed_loads_the_recipes_normalizer_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    recipe = InputNormalization(norm_type="global", update_until_epoch=4)
    for _ in range(3):
        recipe(torch.randn(4, 30, 8) * 2 + 1, torch.ones(4), epoch=1)
    Checkpointer(tmp_path / "save", {"normalizer": recipe}).save_checkpoint()
    recipe.eval()
    x = torch.randn(2, 9000, 8)  # longer than the window: global statistics all the same

    resumed = WindowedInputNormalization(norm_type="global", update_until_epoch=4)
    Checkpointer(tmp_path / "save", {"normalizer": resumed}).recover_if_possible()
    assert resumed.count == recipe.count == 3 * 4 * 30  # frames seen
    assert torch.equal(resumed.eval()(x, torch.ones(2)), recipe(x, torch.ones(2)))

    # The way SpeechBrain's pretrained interfaces (EncoderASR...) load a model folder.
    ckpt = next((tmp_path / "save").glob("CKPT+*")) / "normalizer.ckpt"
    exported = WindowedInputNormalization(norm_type="global")
    pretrainer = Pretrainer(
        collect_in=tmp_path / "collect", loadables={"normalizer": exported},
        paths={"normalizer": str(ckpt)},
    )
    pretrainer.collect_files()
    pretrainer.load_collected()
    assert torch.equal(exported.eval()(x, torch.ones(2)), recipe(x, torch.ones(2)))
    assert exported.state_dict().keys() == recipe.state_dict().keys()


def test_windowed_rejects_what_it_cannot_window() -> None:
    with pytest.raises(ValueError, match="norm_type 'batch'"):
        WindowedInputNormalization(norm_type="batch")
    with pytest.raises(ValueError, match="window_frames must be a positive number.*got 0"):
        WindowedInputNormalization(window_frames=0)
    with pytest.raises(ValueError, match="length_dim must be 1"):
        WindowedInputNormalization(length_dim=2)
