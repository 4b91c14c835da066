"""``--record_statistics``: the four batch statistics of the paper, per layer and iteration.

For every batch-normalization layer (BN, ghost BN, BRN, MABN, SyncBN: every ``_BatchNorm``) and
the first normalization group of the process's batch (its ``b`` first samples; the whole local
batch for SyncBN), per channel:

* ``mu_B``: mean of the layer input ``x``;
* ``sigma2_B``: (biased) variance of ``x``;
* ``g_B``: mean of ``dL/dx_hat``;
* ``Psi_B``: mean of ``x_hat * dL/dx_hat``;

with ``x_hat = (y - beta) / gamma`` the normalized input as the layer applied it (``y`` its
output), so ``dL/dx_hat = gamma * dL/dy`` and ``x_hat * dL/dx_hat = (y - beta) * dL/dy``. For BN
this is the usual ``x_hat``; for MABN and BRN it includes the renormalization factors. The means
run over the group's samples and pixels. Logged to TensorBoard as
``<layer>/<statistic>/channel<c>`` (one channel, ``--stat_channel``) and
``<layer>/<statistic>/mean_abs`` (the mean absolute value over channels), at step = iteration,
in ``<save>/statistics/bs_<per-process batch>`` (``_nb<b>`` appended when the normalization batch
is smaller), on rank 0.

Gradients are taken by an identity autograd function put after the layer (a forward hook
returns its output), which sees ``dL/dy`` whatever follows (an in-place ReLU, for instance).
"""
from __future__ import annotations

import os
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["STATISTICS", "StatisticsRecorder", "statistics_dir"]

STATISTICS = ("mu_B", "sigma2_B", "g_B", "Psi_B")


def statistics_dir(save: str, per_gpu_batch: int, norm_batch: Optional[int]) -> str:
    name = f"bs_{per_gpu_batch}"
    if norm_batch is not None and norm_batch < per_gpu_batch:
        name += f"_nb{norm_batch}"
    return os.path.join(save, "statistics", name)


class _GradTap(torch.autograd.Function):
    """Identity (a copy) whose backward hands ``dL/dy`` to a callback.

    A copy, so that in-place ops after the norm (``ReLU(inplace=True)``) act on it and not on the
    norm's output, whatever that output is (a view, for some layers); it costs one activation per
    layer, only while statistics are recorded.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, callback) -> torch.Tensor:  # type: ignore[override]
        ctx.callback = callback
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.callback(grad)
        return grad, None


class StatisticsRecorder:
    """Hooks on every ``_BatchNorm`` of ``model``; call :meth:`set_step` before the forward and
    :meth:`flush` after the backward of each iteration."""

    def __init__(self, model: nn.Module, log_dir: str, group_size: int, channel: int = 0, interval: int = 1,
                 writer=None):
        self.layers = [(name, module) for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
        if not self.layers:
            raise ValueError("--record_statistics found no batch-normalization layer in the model")
        narrowest = min(module.num_features for _, module in self.layers)
        if channel >= narrowest:
            raise ValueError(f"--stat_channel {channel} is out of range: the narrowest layer has {narrowest} channels")
        self.group_size = group_size
        self.channel = channel
        self.interval = interval
        self.step = 0
        self.active = False
        self.pending: Dict[str, Dict[str, torch.Tensor]] = {}
        self.log_dir = log_dir
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir)
        self.writer = writer
        self.handles = [module.register_forward_hook(partial(self._forward_hook, name)) for name, module in self.layers]

    def set_step(self, step: int) -> None:
        self.step = step
        self.active = step % self.interval == 0
        self.pending.clear()

    @staticmethod
    def _dims(x: torch.Tensor) -> List[int]:
        return [0] + list(range(2, x.dim()))

    @staticmethod
    def _channel_view(t: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if t is None:
            return torch.zeros((), device=x.device)
        return t.detach().float().view([1, -1] + [1] * (x.dim() - 2))

    def _forward_hook(self, name: str, module: nn.Module, inputs, output) -> Optional[torch.Tensor]:
        if not (self.active and module.training) or not isinstance(output, torch.Tensor):
            return None
        with torch.no_grad():
            x = inputs[0].detach()[:self.group_size].float()
            dims = self._dims(x)
            variance, mean = torch.var_mean(x, dim=dims, correction=0)
            self.pending[name] = {"mu_B": mean, "sigma2_B": variance}
            centred = output.detach()[:self.group_size].float() - self._channel_view(getattr(module, "bias", None), x)
        if output.requires_grad and torch.is_grad_enabled():
            return _GradTap.apply(output, partial(self._grad_hook, name, module, centred))
        return None

    @torch.no_grad()
    def _grad_hook(self, name: str, module: nn.Module, centred: torch.Tensor, grad: torch.Tensor) -> None:
        dy = grad.detach()[:self.group_size].float()
        dims = self._dims(dy)
        weight = getattr(module, "weight", None)
        gamma = weight.detach().float() if weight is not None else torch.ones(dy.shape[1], device=dy.device)
        entry = self.pending.setdefault(name, {})
        entry["g_B"] = dy.mean(dim=dims) * gamma
        entry["Psi_B"] = (centred * dy).mean(dim=dims)

    @torch.no_grad()
    def flush(self, grad_scale: float = 1.0) -> None:
        """Write the statistics of the current iteration (gradients divided by ``grad_scale``)."""
        if not self.active or not self.pending:
            return
        rows, tags = [], []
        for name, _ in self.layers:
            entry = self.pending.get(name, {})
            for stat in STATISTICS:
                if stat not in entry:
                    continue
                value = entry[stat] / grad_scale if stat in ("g_B", "Psi_B") else entry[stat]
                rows.append(torch.stack([value[self.channel], value.abs().mean()]))
                tags.append(f"{name}/{stat}")
        values = torch.stack(rows).cpu().tolist()
        for tag, (channel_value, summary) in zip(tags, values):
            self.writer.add_scalar(f"{tag}/channel{self.channel}", channel_value, self.step)
            self.writer.add_scalar(f"{tag}/mean_abs", summary, self.step)
        self.pending.clear()

    def close(self) -> None:
        """Remove the hooks and close the writer (again: nothing)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
