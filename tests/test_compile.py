"""The training step under torch.compile: the model's forward, its losses and their backward trace
as one graph (``fullgraph=True``: no graph break), with the eager model's numbers; and the step
captured as a CUDA graph (GPU only)."""

import copy

import pytest
import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.distributions import reconstruction_loss
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import Runtime
from nvae_fast.train.trainer import Trainer

from conftest import requires_cuda
from tolerances import assert_close

# The smallest model with every kind of part of the official one: flows, SE, residual posteriors,
# combiner cells, down and up cells (in the pre- and postprocessing); tracing costs time per
# operation, not per value, so one latent scale.
SMALL = dict(num_latent_scales=1, num_groups_per_scale=2, num_preprocess_cells=1, num_postprocess_cells=1)


def _loss(model: NVAE, x: torch.Tensor) -> torch.Tensor:
    logits, _, _, kl_all, _ = model(x)
    nelbo = (reconstruction_loss(model.decoder_output(logits), x, model.crop_output) + sum(kl_all)).mean()
    return nelbo + 1e-2 * (model.spectral_norm_parallel() + model.batchnorm_loss())


def test_model_forward_losses_and_backward_compile_as_one_graph():
    """fullgraph=True fails on any graph break, in the forward or in the backward of an
    autograd.Function (dynamo traces both); the "eager" backend runs the captured graph as it is,
    so the numbers check what dynamo traced (the custom ops' fake implementations are checked by
    each op's opcheck test). Inductor's C++ code generation would add minutes of CPU and no check
    of ours; AOTAutograd twice the tracing time (about 20 s of CPU as it is)."""
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny_mnist", **SMALL)).train()
    with torch.no_grad():
        model.spectral_norm_parallel()   # the first call draws the power iteration's start vectors
    reference = copy.deepcopy(model)
    x = torch.bernoulli(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)))
    compiled = torch.compile(_loss, fullgraph=True, backend="eager")
    torch.manual_seed(5)
    loss = compiled(model, x)
    loss.backward()
    torch.manual_seed(5)
    expected = _loss(reference, x)
    expected.backward()
    assert_close(loss, expected, scale=abs(expected.item()))
    grad_scale = max(p.grad.abs().max().item() for p in reference.parameters())
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, p_ref.grad, scale=grad_scale, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        if b.is_floating_point():
            assert_close(b, b_ref, msg=name)
        else:
            assert torch.equal(b, b_ref), name
    for shape, u in model._sr_u.items():
        assert_close(u, reference._sr_u[shape], msg=f"power-iteration vector {tuple(shape)}")


@requires_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_step_matches_the_eager_step(compile):
    """Steps replayed from a CUDA graph do what eager steps do (same weights after four steps:
    three warm-up steps, then capture and replay), and the captured step makes no host
    synchronisation."""
    config = NVAEConfig.preset("tiny_cifar10")
    cfg = TrainConfig(batch_size=4, epochs=2, warmup_epochs=1, amp="off")
    rt = Runtime(torch.device("cuda"))
    x = torch.rand(4, 3, 32, 32, device="cuda")
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(NVAE(config), cfg, rt, steps_per_epoch=10, compile=compile, cuda_graphs=graphs)
        for _ in range(5):
            trainer.train_step(x, deterministic=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats = trainer.train_step(x, deterministic=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(stats.ok)
        results.append(trainer.model.state_dict())
    for name, value in results[0].items():
        if value.is_floating_point():
            assert_close(results[1][name], value, scale=10, msg=name)
        else:
            assert torch.equal(results[1][name], value), name
