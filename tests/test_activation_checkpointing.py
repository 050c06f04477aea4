"""Activation checkpointing (``activation_checkpointing: True``): the same gradients, fewer
saved activations, recomputation only in training, unchanged names and checkpoints, DDP."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpointing_models import (
    ddp_worker,
    loss_of,
    max_rel_err,
    step,
    tiny_batch,
    tiny_model,
    with_and_without,
)
from conftest import REPO
from speechbrain.utils.checkpoints import Checkpointer

import train_CTC
from mamba_asr.command_line import ConfigError
from mamba_asr.config import load_config
from modules import activation_checkpointing as ac
from modules.mamba import selective_scan_interface as ssi

_TRITON, _TRITON_WHY = ssi._load_triton_scan()
_MAMBA_SSM = ssi._load_mamba_ssm().fn is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", ["torch", "ref"])
def test_conmamba_encoder_and_mamba_decoder_gradients_agree(impl, monkeypatch) -> None:
    """Dropout 0.1, padded items and targets: same loss and gradients (fp32) on both CPU
    scan paths; every encoder and decoder layer recomputes."""
    monkeypatch.setenv(ssi.ENV_VAR, impl)
    (loss, grads), (loss_ckpt, grads_ckpt), layers = with_and_without("conmamba-mamba")
    assert layers == 4
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert max_rel_err(grads_ckpt, grads) <= 1e-6
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("pair", ["conformer-transformer", "transformer-transformer"])
def test_speechbrain_encoders_and_transformer_decoder_gradients_agree(pair) -> None:
    (loss, grads), (loss_ckpt, grads_ckpt), layers = with_and_without(pair)
    assert layers == 4
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert max_rel_err(grads_ckpt, grads) <= 1e-6


@pytest.mark.parametrize("pair", ["conmamba-mamba", "conformer-transformer"])
def test_bf16_autocast_gradients_agree(pair) -> None:
    """CPU bf16 autocast: the recomputation runs under the same autocast state, so the
    gradients agree to bf16 precision."""
    (loss, grads), (loss_ckpt, grads_ckpt), _ = with_and_without(pair, autocast=torch.bfloat16)
    assert loss_ckpt == pytest.approx(loss, rel=1e-2)
    assert max_rel_err(grads_ckpt, grads) <= 2e-2


# --------------------------------------------------------------------------- recomputation


def linear_calls(model: torch.nn.Module, **step_kwargs) -> int:
    """Calls of the encoder/decoder layers' Linear modules in one forward + backward."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    handles = [m.register_forward_pre_hook(count) for layer in model.modules()
               if isinstance(layer, ac.LAYER_TYPES) for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        step(model, **step_kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls[0]


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward (outside
    checkpointed layers; those keep their inputs only)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        src, wav_len, tgt = tiny_batch()
        loss = loss_of(model, src, wav_len, tgt)
    loss.backward()
    return total[0]


@pytest.mark.parametrize("pair", ["conmamba-mamba", "conformer-transformer"])
def test_layers_recompute_in_the_backward_pass(pair) -> None:
    """Every layer's Linear modules run twice per step with checkpointing (forward and
    recomputation), once without; the activations autograd keeps shrink to a fraction."""
    model = tiny_model(pair)
    plain_calls, plain_saved = linear_calls(model), saved_bytes(model)
    assert ac.enable_activation_checkpointing(model) == 4
    assert ac.enable_activation_checkpointing(model) == 4  # idempotent
    assert plain_calls > 0 and linear_calls(model) == 2 * plain_calls
    assert saved_bytes(model) < 0.5 * plain_saved
    assert ac.disable_activation_checkpointing(model) == 4
    assert linear_calls(model) == plain_calls and not ac.checkpointed_layers(model)


def test_first_layers_of_each_stack_recompute_with_a_layer_count() -> None:
    """``layers=1``: the first layer of the encoder and of the decoder recompute, the others
    not; the gradients still agree, with half the recomputation."""
    model = tiny_model("conmamba-mamba")
    plain_calls, (loss, grads) = linear_calls(model), step(model)
    stacks = ac.layer_stacks(model)
    assert [len(s) for s in stacks] == [2, 2]
    assert ac.enable_activation_checkpointing(model, layers=1) == 2
    assert ac.checkpointed_layers(model) == [stacks[0][0], stacks[1][0]]
    assert linear_calls(model) == plain_calls * 3 // 2  # one of two layers per stack twice
    loss_ckpt, grads_ckpt = step(model)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert max_rel_err(grads_ckpt, grads) <= 1e-6
    with pytest.raises(ValueError, match="layers must be >= 0"):
        ac.enable_activation_checkpointing(model, layers=-1)


def test_checkpointing_only_in_training_with_gradients(monkeypatch) -> None:
    """Validation, test and inference (eval mode, or no_grad) run the layers plainly."""
    calls = []
    original = ac.checkpoint
    monkeypatch.setattr(ac, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tiny_model("conmamba-mamba")
    ac.enable_activation_checkpointing(model)
    src, wav_len, tgt = tiny_batch()
    counts = []
    for training, grad in ((True, True), (False, True), (True, False), (False, False)):
        calls.clear()
        with torch.set_grad_enabled(grad):
            model.train(training)(src, tgt, wav_len)
        counts.append(len(calls))
    assert counts == [4, 0, 0, 0]


# --------------------------------------------------------------------------- names, checkpoints


def test_names_state_dict_and_checkpoints_unchanged(tmp_path: Path) -> None:
    """Parameter and state_dict names are the plain model's; a checkpoint saved with it loads
    strictly into a model without it and vice versa, and the saved files are the same."""
    plain = tiny_model("conmamba-mamba", seed=0)
    ckpt = tiny_model("conmamba-mamba", seed=0)
    ac.enable_activation_checkpointing(ckpt)
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in ckpt.named_modules()] == [n for n, _ in plain.named_modules()]
    assert list(ckpt.state_dict()) == list(plain.state_dict())

    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        checkpointer = Checkpointer(tmp_path / name, recoverables={"model": model})
        saved[name] = Path(checkpointer.save_checkpoint(name="x").path) / "model.ckpt"
    assert saved["plain"].read_bytes() == saved["ckpt"].read_bytes()

    other_plain = tiny_model("conmamba-mamba", seed=5)
    other_ckpt = tiny_model("conmamba-mamba", seed=6)
    ac.enable_activation_checkpointing(other_ckpt)
    other_plain.load_state_dict(torch.load(saved["ckpt"]), strict=True)
    other_ckpt.load_state_dict(torch.load(saved["plain"]), strict=True)
    for a, b in ((other_plain, ckpt), (other_ckpt, plain)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                      b.state_dict().values(), strict=True))


# --------------------------------------------------------------------------- recipe, DDP


@pytest.mark.parametrize(("setting", "layers"), [("True", 2), ("False", 0), ("1", 1)])
def test_recipe_brain_applies_the_key_before_training(setting, layers, tmp_path, caplog) -> None:
    """True: the demo's 2 ConMamba encoder layers recompute; 1: the first of the stack."""
    argv = ["hparams/CTC/demo.yaml", "--data_folder", str(REPO / "data" / "demo"),
            "--output_folder", str(tmp_path / "run"), "--activation_checkpointing", setting]
    _, hparams, run_opts, _ = load_config(argv, train_CTC.KEYS, write_output=False)
    brain = train_CTC.build_brain(hparams, run_opts, hparams["checkpointer"])
    with caplog.at_level(logging.INFO, logger="mamba_asr.brain"):
        brain.on_fit_start()
    checkpointed = ac.checkpointed_layers(brain.hparams.model)
    assert checkpointed == list(brain.hparams.Transformer.encoder.layers[:layers])
    lines = [r.getMessage() for r in caplog.records if "activation_checkpointing" in
             r.getMessage()]
    assert lines == ([f"activation_checkpointing: {layers} encoder/decoder layers recompute "
                      "their activations in the backward pass"] if layers else [])


def test_recipe_brain_refuses_a_bad_setting(tmp_path) -> None:
    argv = ["hparams/CTC/demo.yaml", "--data_folder", str(REPO / "data" / "demo"),
            "--output_folder", str(tmp_path / "run"), "--activation_checkpointing", "0.5"]
    _, hparams, run_opts, _ = load_config(argv, train_CTC.KEYS, write_output=False)
    brain = train_CTC.build_brain(hparams, run_opts, hparams["checkpointer"])
    with pytest.raises(ConfigError, match=r"activation_checkpointing: expected True, False or "
                                          r"a number of layers .*got 0\.5"):
        brain.on_fit_start()


def test_ddp_step_with_checkpointing_matches_one_process(tmp_path: Path) -> None:
    """Two gloo processes, each half the batch, checkpointed: both end with the gradients of
    the whole batch in one process without checkpointing."""
    import torch._dynamo  # noqa: F401  (DDP's constructor imports it: 2-3 s, once, before the fork)

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(ddp_worker, args=(2, str(tmp_path)), nprocs=2,
                                          join=True, start_method=method)
    model = tiny_model("conmamba-mamba", dropout=0.0)
    _, expected = step(model)
    for rank in range(2):
        result = torch.load(tmp_path / f"grads{rank}.pt")
        assert result["layers"] == 4
        assert max_rel_err(result["grads"], expected) <= 1e-5, rank


# --------------------------------------------------------------------------- GPU paths


@pytest.mark.skipif(_TRITON is None, reason=f"triton unavailable: {_TRITON_WHY}")
@pytest.mark.slow
def test_triton_scan_gradients_agree_in_the_interpreter() -> None:
    """The Triton scan (``MAMBA_ASR_SCAN_IMPL=triton``) in Triton's CPU interpreter, in a
    subprocess (the variable must be set before the kernels are defined)."""
    code = ("from checkpointing_models import with_and_without, max_rel_err; "
            "(l, g), (lc, gc), n = with_and_without('conmamba', batch=2, frames=12, layers=1, "
            "d_model=8, bidirectional=False); print(n, abs(lc - l) / abs(l), max_rel_err(gc, g))")
    env = dict(os.environ, TRITON_INTERPRET="1", MAMBA_ASR_SCAN_IMPL="triton",
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers, loss_err, grad_err = proc.stdout.split()
    assert int(layers) == 1 and float(loss_err) <= 1e-6 and float(grad_err) <= 1e-6


@needs_cuda
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_cuda_scan_paths_gradients_agree(impl, monkeypatch) -> None:
    if impl == "triton" and _TRITON is None:
        pytest.skip(f"triton unavailable: {_TRITON_WHY}")
    if impl == "cuda" and not _MAMBA_SSM:
        pytest.skip("mamba-ssm kernels unavailable")
    monkeypatch.setenv(ssi.ENV_VAR, impl)
    (loss, grads), (loss_ckpt, grads_ckpt), _ = with_and_without("conmamba-mamba", "cuda")
    assert loss_ckpt == pytest.approx(loss, rel=1e-5)
    assert max_rel_err(grads_ckpt, grads) <= 1e-5


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pair", ["conmamba-mamba", "conformer-transformer"])
def test_cuda_autocast_gradients_agree(pair, dtype) -> None:
    (loss, grads), (loss_ckpt, grads_ckpt), _ = with_and_without(pair, "cuda", autocast=dtype)
    assert loss_ckpt == pytest.approx(loss, rel=1e-2)
    assert max_rel_err(grads_ckpt, grads) <= 2e-2

