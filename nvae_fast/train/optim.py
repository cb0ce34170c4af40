"""Optimizer and weight averaging whose updates a device-side flag can cancel, without the host
ever reading it: a training step that finds a NaN/Inf decides on the device to skip, as
``torch.amp.GradScaler`` does with its ``found_inf`` (and as fused optimizers take it).

* :class:`GuardedAdamax` - ``torch.optim.Adamax`` (same hyper-parameters, same state and
  state_dict, so checkpoints move between the two) whose ``step(ok=flag)`` applies the update
  where ``flag`` is true and leaves parameters and state bitwise untouched where it is false.
  All arithmetic is multi-tensor (``torch._foreach_*``): a few launches per step for every
  parameter of the model, the step counters live on the device.
* :func:`update_ema` - the exponential moving average of ``torch.optim.swa_utils.AveragedModel``
  (``get_ema_multi_avg_fn``), updated under the same flag.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def _step_flag(ok: Tensor | None, like: Tensor) -> Tensor:
    if ok is None:
        return torch.ones((), device=like.device, dtype=torch.float32)
    return ok.to(device=like.device, dtype=torch.float32)


class GuardedAdamax(torch.optim.Adamax):
    """Adamax (Kingma & Ba) as ``torch.optim.Adamax`` computes it, with a device-side skip flag.

    ``step(ok=flag)`` with ``flag`` a 0-d bool tensor: where it is false the parameters, moments
    and step counters keep their values exactly, whatever the gradients hold (NaN, Inf). The
    gradients are first copied into one flat buffer and zeroed there when the flag is false (one
    concatenation, one fill), so that no NaN reaches the arithmetic; the update itself is a dozen
    ``_foreach`` launches. ``lr`` may be a float or a tensor (a tensor keeps a captured CUDA graph
    following the scheduler). ``maximize`` and complex parameters are not supported.
    """

    def __init__(self, params, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)

    @torch.no_grad()
    def step(self, closure=None, ok: Tensor | None = None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("GuardedAdamax.step does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, ok)
        return None

    def _state(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:   # a state_dict of torch.optim.Adamax keeps steps on the CPU
            state["step"] = state["step"].to(p.device, torch.float32)
        return state["step"], state["exp_avg"], state["exp_inf"]

    def _update(self, group: dict, params: list[Tensor], ok: Tensor | None) -> None:
        if group["maximize"] or any(torch.is_complex(p) for p in params):
            raise ValueError("GuardedAdamax supports neither maximize nor complex parameters")
        beta1, beta2 = group["betas"]
        steps, exp_avgs, exp_infs = zip(*(self._state(p) for p in params))
        grads = [p.grad for p in params]
        flag = _step_flag(ok, params[0])
        if ok is not None:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat.masked_fill_(flag == 0, 0.0)
            grads = [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]
        torch._foreach_add_(list(steps), flag, alpha=1.0)   # alpha picks the overload that keeps flag a tensor
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        elif ok is None:
            grads = torch._foreach_mul(grads, 1.0)   # the in-place ops below must not touch p.grad
        torch._foreach_lerp_(list(exp_avgs), grads, [flag * (1.0 - beta1)] * len(params))
        norm = torch._foreach_mul(list(exp_infs), beta2)
        torch._foreach_abs_(grads)
        torch._foreach_add_(grads, group["eps"])
        torch._foreach_maximum_(norm, grads)
        torch._foreach_lerp_(list(exp_infs), norm, [flag] * len(params))
        # Every parameter of a group steps together: one counter gives the bias correction.
        step = steps[0].clamp(min=1.0)
        step_size = flag * group["lr"] / (1.0 - beta1 ** step)
        # ``norm`` equals the new exp_inf on an applied step and is >= eps always, so a skipped
        # first step (exp_inf still 0) divides by no zero.
        update = torch._foreach_div(list(exp_avgs), norm)
        torch._foreach_mul_(update, step_size)
        torch._foreach_sub_(params, update)


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module, decay: float, ok: Tensor | None = None) -> None:
    """``ema``'s parameters move towards ``model``'s by ``1 - decay`` (the first update copies
    them), where ``ok`` holds; with ``ok`` false nothing changes. The counter ``ema.n_averaged``
    counts the updates, all on the device."""
    ema_params = [p.detach() for p in ema.module.parameters()]
    params = [p.detach() for p in model.parameters()]
    flag = _step_flag(ok, ema.n_averaged)
    first = (ema.n_averaged == 0).to(torch.float32)
    weight = flag * (first + (1.0 - first) * (1.0 - decay))
    torch._foreach_lerp_(ema_params, params, [weight] * len(params))
    ema.n_averaged.add_(flag.to(ema.n_averaged.dtype))
