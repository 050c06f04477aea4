"""Apple MPS support, checked without a Mac: every operator the Mamba layers and the recipes
run has an MPS kernel in torch's registry and no tensor is float64 (which MPS lacks); the CTC
loss, which MPS lacks, runs on the CPU there. On a Mac the MPS tests run the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import speechbrain as sb
import torch
from mps_kernels import (
    MPS_DTYPES,
    OpRecorder,
    assert_mps_ready,
    mps_kernel,
    record_recipe,
    without_mps,
)
from test_mamba_modules import small_asr
from test_selective_scan import make_inputs

from mamba_asr import losses
from mamba_asr.losses import ctc_device, ctc_loss
from modules.mamba.selective_scan_interface import selective_scan_fn

needs_mps = pytest.mark.skipif(not torch.backends.mps.is_available(),
                               reason="Apple MPS not available")


def test_registry_lookup_tells_kernels_apart() -> None:
    assert mps_kernel("aten::addcmul_") is True  # MPS in its own table
    assert mps_kernel("aten::mul.Tensor") is True  # through its structured delegate mul.out
    assert mps_kernel("aten::view") is True  # device-generic
    assert "CPU, CUDA only" in mps_kernel("aten::_ctc_loss.Tensor")
    assert "CPU, CUDA only" in mps_kernel("aten::linalg_eig")
    assert "not in torch's operator registry" in mps_kernel("aten::no_such_op")


def test_mamba_layers_run_only_operators_mps_has() -> None:
    """The selective scan as MPS runs it (the chunking of GPUs: shapes only, on the meta
    device) and a ConMamba encoder + Mamba decoder training step and decoding step."""
    recorder = OpRecorder()
    inputs = make_inputs(2, 8, 16, 40, 2, torch.float32, device="meta")
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    model = small_asr().train()
    feats, tokens = torch.randn(2, 20, 24), torch.randint(3, 40, (2, 5))
    with recorder:
        y, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True)
        (y.sum() + last.sum()).backward()
        scan_ops = set(recorder.ops)
        enc, dec = model(feats, tokens, torch.tensor([1.0, 0.5]))
        (enc.pow(2).mean() + dec.pow(2).mean()).backward()
        model.eval()
        state = model.init_decoder_state(enc.detach(), torch.tensor([20, 10]))
        model.decode_step(tokens[:, 0], 0, state)
    assert {"aten::exp2_", "aten::addcmul_", "aten::bmm.out"} <= scan_ops  # the scan ran
    assert "aten::convolution" in recorder.ops and len(recorder.ops) > 60
    assert without_mps(recorder.ops) == {}
    assert recorder.dtypes <= MPS_DTYPES, recorder.dtypes


@pytest.mark.slow
def test_ctc_recipe_batches_run_only_operators_mps_has(demo_corpus: Path, tmp_path: Path) -> None:
    """One epoch of the CTC demo recipe on a few utterances (training, validation and test
    batches: features, augmentation, model, loss, optimizer, beam search)."""
    recorded = record_recipe("train_CTC.py", [
        "hparams/CTC/demo.yaml", "--data_folder", str(demo_corpus), "--output_folder",
        str(tmp_path / "run"), "--select_n_sentences", "[16, 8, 8, 8]",
        "--number_of_epochs", "1", "--noprogressbar"], tmp_path)
    assert_mps_ready(recorded)


def test_ctc_device_is_the_cpu_for_mps_only() -> None:
    assert ctc_device(torch.device("mps")) == torch.device("cpu")
    assert ctc_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert ctc_device(torch.device("cpu")) == torch.device("cpu")


def test_ctc_loss_computed_on_another_device_hands_back_value_and_gradient(monkeypatch) -> None:
    """The MPS branch of ``ctc_loss`` on this machine: a stand-in device check sends CPU
    tensors to "cpu:0", which torch treats as another device (``.to`` copies them, with a
    copy's backward). SpeechBrain's loss gets the copies; value and gradient come back equal
    to SpeechBrain's computed in place."""
    monkeypatch.setattr(losses, "ctc_device", lambda device: torch.device("cpu", 0))
    handed: list[tuple] = []

    def speechbrain_ctc_loss(*args):
        handed.append(args)
        return sb.nnet.losses.ctc_loss(*args)

    monkeypatch.setattr(losses, "_speechbrain_ctc_loss", speechbrain_ctc_loss)
    torch.manual_seed(0)
    logits = torch.randn(3, 30, 12, requires_grad=True)
    log_probs = logits.log_softmax(-1)
    targets, lens = torch.randint(1, 12, (3, 7)), torch.tensor([1.0, 0.8, 0.5])
    tlens = torch.tensor([1.0, 5 / 7, 3 / 7])
    ours = ctc_loss(log_probs, targets, lens, tlens, blank_index=0)
    (g_ours,) = torch.autograd.grad(ours, logits)
    assert len(handed) == 1
    for given, copy in zip((log_probs, targets, lens, tlens), handed[0][:4], strict=True):
        assert copy is not given and copy.data_ptr() != given.data_ptr()
        assert torch.equal(copy, given)
    assert type(handed[0][0].grad_fn).__name__ == "ToCopyBackward0"
    assert ours.device == log_probs.device and ours.item() > 0
    theirs = sb.nnet.losses.ctc_loss(logits.log_softmax(-1), targets, lens, tlens, 0)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert torch.allclose(g_ours, g_theirs)


@needs_mps
def test_ctc_loss_on_mps_matches_cpu() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 30, 12)
    targets, lens = torch.randint(1, 12, (3, 7)), torch.tensor([1.0, 0.8, 0.5])
    tlens = torch.tensor([1.0, 5 / 7, 3 / 7])
    cpu = logits.clone().requires_grad_()
    ref = ctc_loss(cpu.log_softmax(-1), targets, lens, tlens, 0)
    ref.backward()
    mps = logits.to("mps").requires_grad_()
    loss = ctc_loss(mps.log_softmax(-1), targets.to("mps"), lens.to("mps"), tlens.to("mps"), 0)
    loss.backward()
    assert loss.device.type == "mps" and mps.grad.device.type == "mps"
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    assert torch.allclose(mps.grad.cpu(), cpu.grad, atol=1e-5)
