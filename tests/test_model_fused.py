"""nvae_fast.NVAE on the fused kernels: with the triton backend (on the GPU where there is one, else
the interpreter on CPU) the decoder's inverted-residual cells run the fused cell and the KL runs its
Triton kernels, with the eager model's numbers."""

import copy

import pytest
import torch

import nvae_fast
import nvae_fast.nn.cells as cells
from nvae_fast import NVAE
from nvae_fast.distributions import reconstruction_loss
from nvae_fast.nn.cells import InvertedResidualCell

from conftest import HAS_CUDA
from tolerances import TOL, assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the decoder cells that took the fused path."""
    calls = []
    original = cells.gen_cell

    def counting(*args, **kwargs):
        calls.append(kwargs.get("upsample"))
        return original(*args, **kwargs)

    monkeypatch.setattr(cells, "gen_cell", counting)
    return calls


def _train_step_then_eval(backend):
    torch.manual_seed(0)
    model = NVAE.from_preset("tiny_cifar10").to(DEVICE).train()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(5)   # the same noise in both runs
    with nvae_fast.use_backend(backend):
        outputs = model(x)
        logits, _, _, kl_all, _ = outputs
        loss = (reconstruction_loss(model.decoder_output(logits), x, crop=model.crop_output) + sum(kl_all)).mean()
        loss.backward()
        model.eval()
        with torch.no_grad():
            eval_logits = model(x, deterministic=True)[0]
    return model, outputs, eval_logits


@pytest.mark.gpu
def test_triton_backend_matches_the_eager_model(fused_calls):
    eager_model, eager_out, eager_eval = _train_step_then_eval("torch")
    assert not fused_calls
    fused_model, fused_out, fused_eval = _train_step_then_eval("triton")
    # tiny_cifar10: 3 normal_dec + 1 up_dec + up_post + normal_post, in training and in eval
    assert sorted(fused_calls) == sorted([False, False, False, True, True, False] * 2)

    logits, log_q, log_p, kl_all, kl_diag = fused_out
    e_logits, e_log_q, e_log_p, e_kl_all, e_kl_diag = eager_out
    for name, got, expected in [("logits", logits, e_logits), ("log_q", log_q, e_log_q), ("log_p", log_p, e_log_p),
                                *(("kl_all", a, b) for a, b in zip(kl_all, e_kl_all)),
                                *(("kl_diag", a, b) for a, b in zip(kl_diag, e_kl_diag)),
                                ("eval logits", fused_eval, eager_eval)]:
        assert_close(got, expected, scale=10 * max(1.0, expected.abs().max().item()), msg=name)
    # Gradients: fp32 sums in another order, relative to the largest gradient of the model (some,
    # like a bias before a BatchNorm, are zero up to rounding).
    grad_scale = max(p.grad.abs().max().item() for p in eager_model.parameters() if p.grad is not None)
    for (name, p), p_e in zip(fused_model.named_parameters(), eager_model.parameters()):
        assert (p.grad is None) == (p_e.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, p_e.grad, scale=10 * grad_scale, msg=f"grad {name}")
    for (name, b), b_e in zip(fused_model.named_buffers(), eager_model.buffers()):
        if b.dtype.is_floating_point:
            assert_close(b, b_e, scale=10, msg=name)
        else:
            assert torch.equal(b, b_e), name


def test_cpu_tensors_keep_the_eager_cells_by_default(fused_calls):
    model = NVAE.from_preset("tiny_cifar10").eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32), deterministic=True)
    assert not fused_calls


@pytest.mark.gpu
@pytest.mark.parametrize("cell_type,op,c_in,c_out", [("normal_dec", "mconv_e6k5g0", 8, 8),
                                                      ("up_post", "mconv_e3k5g0", 8, 4)])
def test_fused_cell_under_autocast(fused_calls, cell_type, op, c_in, c_out):
    """Under bf16 autocast the fused cell runs its stages in bf16 (as the eager cell's
    convolutions do) and its error against float64 stays within three times the eager cell's."""
    torch.manual_seed(0)
    cell = InvertedResidualCell(c_in, c_out, cell_type, op, use_se=True).to(DEVICE).train()
    x = torch.randn(2, c_in, 4, 4).to(DEVICE)
    size = 8 if cell_type.startswith("up") else 4
    dout = torch.randn(2, c_out, size, size).to(DEVICE)

    def run(module, x, backend, autocast):
        x = x.clone().requires_grad_()
        with nvae_fast.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        out.backward(dout.to(out.dtype))
        return [out.detach().double(), x.grad.double()] + [p.grad.double() for p in module.parameters()]

    truth = run(copy.deepcopy(cell).double(), x.double(), "torch", False)
    eager = run(copy.deepcopy(cell), x, "torch", True)
    fused = run(copy.deepcopy(cell), x, "triton", True)
    assert fused_calls == [cell_type.startswith("up")]
    for i, (t, e, f) in enumerate(zip(truth, eager, fused)):
        err, eager_err = (f - t).abs().max().item(), (e - t).abs().max().item()
        assert err <= 3 * eager_err + TOL[torch.bfloat16][0], f"tensor {i}: error {err:.3g}, eager's {eager_err:.3g}"
