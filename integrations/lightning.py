"""Lightning: balance group losses from a ``LightningModule``.

Needs the ``lightning`` extra (``pip install 'gradient-balancer[lightning]'``). Lightning's automatic
optimization runs one backward pass of the one loss ``training_step`` returns, so no group is ever
captured: a Balancer with weighting plugins there warns (``BalancerWarning``, "no group was
captured") and steps the plain gradient. Balancing needs manual optimization, either by hand::

    def training_step(self, batch, batch_idx):       # with self.automatic_optimization = False
        optimizer = self.optimizers()
        opt = balancer.unwrap(optimizer)              # the Balancer inside LightningOptimizer
        for name, loss in self.losses(batch).items():
            with opt.group(name):
                self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()

or with :class:`BalancedLightningModule`, which does exactly that from a ``group_losses`` method.
Clip with ``Balancer(..., max_grad_norm=c)``: Lightning refuses ``Trainer(gradient_clip_val=...)``
under manual optimization, and ``.grad`` does not hold the update while groups are pending.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from balancer import Balancer, unwrap
from balancer.errors import BalancerError

__all__ = ["BalancedLightningModule"]


class BalancedLightningModule(pl.LightningModule):
    """A ``LightningModule`` whose training step balances the losses of :meth:`group_losses`.

    Subclasses implement :meth:`group_losses` instead of ``training_step`` and return a Balancer
    (or a Balancer with LR schedulers, in any form Lightning accepts) from
    ``configure_optimizers``. Each step: one ``manual_backward`` per group inside its group block
    (Lightning's precision plugin scales the loss as usual), ``optimizer.step()`` (the Balancer
    combines the groups, then the inner optimizer steps) and ``optimizer.zero_grad()``; then the
    LR schedulers with ``interval="step"`` (every ``frequency`` steps; ``interval="epoch"`` ones at
    the end of each epoch). Logged each step: the total loss (``train_loss``) and per group its
    loss, gradient norm and weight (``balancer/loss/<group>``, ``balancer/norm/<group>``,
    ``balancer/weight/<group>``).

    Example::

        class TwoTasks(BalancedLightningModule):
            def group_losses(self, batch, batch_idx):
                return {"math": self.loss(batch["math"]), "code": self.loss(batch["code"])}

            def configure_optimizers(self):
                return Balancer(torch.optim.AdamW(self.parameters(), lr=1e-4), plugins=["task_norm"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def group_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        """The loss of each group for this batch, ``{group name: scalar loss}``; implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement group_losses(batch, batch_idx).")

    def balancer(self) -> Balancer:
        """The Balancer that ``configure_optimizers`` returned (there must be exactly one optimizer)."""
        optimizers = self.optimizers()
        if isinstance(optimizers, list):
            raise BalancerError(
                f"BalancedLightningModule needs one optimizer (a Balancer); configure_optimizers returned "
                f"{len(optimizers)}. One Balancer balances all groups: wrap one optimizer and list every plugin there."
            )
        return unwrap(optimizers)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = dict(self.group_losses(batch, batch_idx))
        if not losses:
            raise BalancerError("group_losses returned no loss; return {group name: loss} with at least one group.")
        optimizer: Any = self.optimizers()
        opt = self.balancer()
        last = len(losses) - 1
        for i, (name, loss) in enumerate(losses.items()):
            with opt.group(name):
                self.manual_backward(loss, retain_graph=i < last)  # the groups may share a forward pass
        optimizer.step()
        optimizer.zero_grad()
        self._step_schedulers("step")
        total = torch.stack([loss.detach().float() for loss in losses.values()]).sum()
        self._log_groups(opt, losses, total)
        return total

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        trainer = self.trainer
        counter = trainer.global_step if interval == "step" else trainer.current_epoch + 1
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or counter % config.frequency:
                continue
            scheduler: Any = config.scheduler
            if config.reduce_on_plateau:
                metric = trainer.callback_metrics.get(config.monitor or "")
                if metric is None:
                    raise BalancerError(
                        f"ReduceLROnPlateau monitors `{config.monitor}`, which was not logged; log it with self.log."
                    )
                scheduler.step(metric)
            else:
                scheduler.step()

    def _log_groups(self, opt: Balancer, losses: Mapping[str, Tensor], total: Tensor) -> None:
        self.log("train_loss", total, on_step=True)
        stats = opt.last_stats
        if stats is None:
            return
        metrics: dict[str, float] = {f"balancer/loss/{n}": float(loss.detach()) for n, loss in losses.items()}
        weights = stats.weights.tolist() if stats.weights is not None else [None] * len(stats.names)
        for name, norm, weight in zip(stats.names, stats.norms.tolist(), weights, strict=True):
            metrics[f"balancer/norm/{name}"] = norm
            if weight is not None:
                metrics[f"balancer/weight/{name}"] = weight
        self.log_dict(metrics, on_step=True)
