"""BalancedLightningModule under Lightning's DDP strategy: 2 CPU ranks (gloo) under torchrun.

Lightning prepares DDP's reduction before each ``manual_backward``, so every group's backward is
averaged over the ranks, and the run equals one process that averages each group's loss over the
batches the two ranks saw (recorded by the run; Lightning's sampler shuffles), on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from tests.integrations.test_lightning import SCALES, _net  # noqa: E402

SAMPLES, BATCH, STEPS = 32, 8, 3  # 16 samples per rank: 2 steps per epoch, the third in epoch 2

SCRIPT = """
import os, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])  # the repository, for the tests' modules
import torch
import lightning.pytorch as pl
from tests.integrations.test_lightning import Mixin
from tests.integrations.test_lightning_distributed import BATCH, STEPS, data

class Recording(Mixin):
    seen = []

    def group_losses(self, batch, batch_idx):
        self.seen.append([t.clone() for t in batch])
        return super().group_losses(batch, batch_idx)

module = Recording()
loader = torch.utils.data.DataLoader(data(), batch_size=BATCH)  # Lightning adds a DistributedSampler
trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train_dataloaders=loader)
rank = int(os.environ["RANK"])
torch.save([p.detach().clone() for p in module.net.parameters()], Path(sys.argv[1]) / f"params{rank}.pt")
torch.save(module.seen, Path(sys.argv[1]) / f"batches{rank}.pt")
"""


def data() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(SAMPLES, 4, generator=gen), torch.randn(SAMPLES, 2, generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def _reference(batches: list[list[list[torch.Tensor]]]) -> list[torch.Tensor]:
    """One process: each step a group's loss is the mean of its loss on the two ranks' batches of that
    step (``batches[rank][step] = [x, y]``), as DDP averages the gradients."""
    from balancer import Balancer

    net = _net()
    opt = Balancer(torch.optim.SGD(net.parameters(), lr=0.1), plugins=["task_norm"])
    for step in range(STEPS):
        losses: dict[str, torch.Tensor] = {"a": torch.zeros(()), "b": torch.zeros(())}
        for xb, yb in (batches[rank][step] for rank in (0, 1)):
            losses["a"] = losses["a"] + torch.nn.functional.mse_loss(net(xb[:4]), yb[:4] * SCALES["a"]) / 2
            losses["b"] = losses["b"] + torch.nn.functional.mse_loss(net(xb[4:]), yb[4:] * SCALES["b"]) / 2
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in net.parameters()]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ddp_equals_one_process_on_the_averaged_groups(launch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    launch(SCRIPT, str(Path(__file__).resolve().parents[2]), timeout=240)
    batches = [torch.load(tmp_path / f"batches{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(batches[0][0][0], batches[1][0][0])  # the ranks saw different samples
    expected = _reference(batches)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"params{rank}.pt", weights_only=True)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = [p.detach() for p in _net().parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(expected, start, strict=True)) > 1e-3  # it trained
