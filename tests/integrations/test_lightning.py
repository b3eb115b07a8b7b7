"""Lightning: balancing from a ``LightningModule`` (manual optimization by hand, and the
``BalancedLightningModule`` mixin), and the warning under automatic optimization."""

from __future__ import annotations

import pytest
import torch

from balancer import Balancer, unwrap
from balancer.errors import BalancerWarning

pl = pytest.importorskip("lightning.pytorch")

from balancer.integrations.lightning import BalancedLightningModule  # noqa: E402

# lightning's pytree helper trips a deprecation of torch's, and it notes the loader's worker count
pytestmark = pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning",
    "ignore:The '\\w+_dataloader' does not have many workers:UserWarning",
)

STEPS = 3
SCALES = {"a": 0.1, "b": 10.0}


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(8 * STEPS, 4, generator=gen), torch.randn(8 * STEPS, 2, generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def _group_losses(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    return {
        "a": torch.nn.functional.mse_loss(net(x[:4]), y[:4] * SCALES["a"]),
        "b": torch.nn.functional.mse_loss(net(x[4:]), y[4:] * SCALES["b"]),
    }


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _fit(module: pl.LightningModule) -> None:
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=_loader())


def _reference(plugins: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same steps in a plain torch loop."""
    net = _net()
    opt = Balancer(torch.optim.SGD(net.parameters(), lr=0.1), plugins=plugins)
    for batch in _loader():
        for name, loss in _group_losses(net, batch).items():
            with opt.group(name):
                loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()], opt.last_stats.weights


class ByHand(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        opt = unwrap(optimizer)
        for name, loss in _group_losses(self.net, batch).items():
            with opt.group(name):
                self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    def configure_optimizers(self):
        return Balancer(torch.optim.SGD(self.parameters(), lr=0.1), plugins=["task_norm"])


class Mixin(BalancedLightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def group_losses(self, batch, batch_idx):
        return _group_losses(self.net, batch)

    def configure_optimizers(self):
        opt = Balancer(torch.optim.SGD(self.parameters(), lr=0.1), plugins=["task_norm"])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Automatic(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        return sum(_group_losses(self.net, batch).values())

    def configure_optimizers(self):
        return Balancer(torch.optim.SGD(self.parameters(), lr=0.1), plugins=["task_norm"])


@pytest.mark.parametrize("module_type", [ByHand, Mixin])
def test_manual_optimization_balances_like_a_plain_loop(module_type):
    module = module_type()
    _fit(module)
    expected, weights = _reference(["task_norm"])
    got = [p.detach() for p in module.net.parameters()]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    opt = unwrap(module.optimizers())
    torch.testing.assert_close(opt.last_stats.weights, weights, rtol=1e-6, atol=0)
    assert opt.last_stats.weights[0] > 2 * opt.last_stats.weights[1]  # the small group is lifted


def test_mixin_logs_per_group_metrics_and_steps_schedulers():
    module = Mixin()
    _fit(module)
    logged = module.trainer.callback_metrics
    for name in SCALES:
        assert f"balancer/weight/{name}" in logged and f"balancer/norm/{name}" in logged
    assert module.trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS


def test_automatic_optimization_warns_that_no_group_was_captured():
    module = Automatic()
    with pytest.warns(BalancerWarning, match="no group was captured"):
        _fit(module)


class _PlainMixin(Mixin):
    """The mixin with no plugin: the update of the bare optimizer on the summed group losses."""

    def configure_optimizers(self):
        opt = Balancer(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9), plugins=[])
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _PlainLightning(pl.LightningModule):
    """Lightning's own automatic optimization on the same data, optimizer and schedule, no Balancer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        return sum(_group_losses(self.net, batch).values())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_with_no_plugin_the_mixin_equals_lightnings_automatic_optimization():
    balanced, plain = _PlainMixin(), _PlainLightning()
    _fit(balanced)
    _fit(plain)
    for a, b in zip(balanced.net.parameters(), plain.net.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert balanced.trainer.global_step == plain.trainer.global_step == STEPS


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"gradient_clip_val": 0.5}, "Automatic gradient clipping is not supported for manual optimization"),
        ({"accumulate_grad_batches": 2}, "Automatic gradient accumulation is not supported for manual optimization"),
    ],
)
def test_trainer_settings_the_mixin_cannot_honour_are_refused(setting, message):
    """Lightning itself refuses them under manual optimization: never a silently unclipped step."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **setting,
    )  # fmt: skip
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(_PlainMixin(), train_dataloaders=_loader())
