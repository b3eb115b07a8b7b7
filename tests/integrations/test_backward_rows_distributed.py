"""``opt.backward_rows`` under DDP on 2 CPU ranks (gloo): the parameters equal one process on the
global batch, with embeddings and LayerNorm in the model, a term that avoids ``at`` (ungrouped) and,
in ``chunked`` mode, two calls per step (the first under ``no_sync()``, each with one group only).
"""

from __future__ import annotations

import json

import pytest
import torch

from balancer import Balancer

STEPS = 3
RANK_ROWS = ["w", "w", "l", "l"]  # each rank's rows; the global batch is rank 0's rows, then rank 1's

COMMON = """
import torch

V, D, T = 11, 6, 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.lin = torch.nn.Linear(D, D)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, 1)

    def forward(self, tokens):
        h0 = self.emb(tokens)
        h = self.norm(torch.tanh(self.lin(h0)) + h0)
        return self.head(h).squeeze(-1).sum(-1)  # [B]: one score per row


def make_model():
    torch.manual_seed(0)
    return Net().double()


def global_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, V, (8, T), generator=gen)
    scale = torch.tensor([0.1, 0.1, 40.0, 40.0] * 2, dtype=torch.float64)  # "w" rows small, "l" rows large
    return tokens, torch.randn(8, generator=gen, dtype=torch.float64) * scale


def call(opt, model, tokens, y, rows, total, reg):
    score = model(tokens)
    loss = (score - y).pow(2).sum() / total
    if reg:  # a regulariser on a parameter below `at`: ungrouped
        loss = loss + 1e-2 * getattr(model, "module", model).emb.weight.pow(2).sum()
    opt.backward_rows(loss, at=score, group=rows)
"""

RANK_SCRIPT = (
    COMMON
    + """
import json, os, sys, contextlib
import torch.distributed as dist
from pathlib import Path
from balancer import Balancer

out, mode, rows = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo")
rank = dist.get_rank()
model = torch.nn.parallel.DistributedDataParallel(make_model())
opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), plugins=["task_norm"])
weights = []
for step in range(STEPS):
    tokens, y = global_batch(step)
    mine = slice(4 * rank, 4 * rank + 4)
    tokens, y = tokens[mine], y[mine]
    if mode == "one":
        call(opt, model, tokens, y, rows, 4, reg=True)
    else:  # two calls, the first without DDP's all-reduce: each holds one group only
        with model.no_sync():
            call(opt, model, tokens[:2], y[:2], rows[:2], 4, reg=False)
        call(opt, model, tokens[2:], y[2:], rows[2:], 4, reg=True)
    opt.step()
    opt.zero_grad()
    weights.append(opt.last_stats.weights.tolist())
torch.save([p.detach().clone() for p in model.parameters()], out / f"params{rank}.pt")
stats = {"names": list(opt.last_stats.names), "weights": weights}
(out / f"stats{rank}.json").write_text(json.dumps(stats))
dist.barrier()
os._exit(0)
""".replace("STEPS", str(STEPS))
)


def _reference(mode: str):
    space: dict = {}
    exec(COMMON, space)
    model = space["make_model"]()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), plugins=["task_norm"])
    rows = RANK_ROWS + RANK_ROWS
    weights = []
    for step in range(STEPS):
        tokens, y = space["global_batch"](step)
        if mode == "one":
            space["call"](opt, model, tokens, y, rows, 8, reg=True)
        else:  # the same chunks of the global batch: each rank's first two rows, then its last two
            first = torch.tensor([0, 1, 4, 5])
            second = torch.tensor([2, 3, 6, 7])
            space["call"](opt, model, tokens[first], y[first], ["w"] * 4, 8, reg=False)
            space["call"](opt, model, tokens[second], y[second], ["l"] * 4, 8, reg=True)
        opt.step()
        opt.zero_grad()
        weights.append(opt.last_stats.weights)
    return [p.detach() for p in model.parameters()], opt.last_stats.names, torch.stack(weights)


@pytest.mark.parametrize("mode", ["one", "chunked"])
def test_two_ranks_match_one_process_on_the_global_batch(mode, launch, tmp_path):
    launch(RANK_SCRIPT, mode, json.dumps(RANK_ROWS))
    expected, names, weights = _reference(mode)
    errors = []
    for rank in range(2):
        got = torch.load(tmp_path / f"params{rank}.pt")
        for p, q in zip(got, expected, strict=True):
            scale = float(q.abs().max())
            errors.append(float((p - q).abs().max()) / scale)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * scale)
        ranked = json.loads((tmp_path / f"stats{rank}.json").read_text())
        assert tuple(ranked["names"]) == names == ("w", "l")
        torch.testing.assert_close(torch.tensor(ranked["weights"], dtype=torch.float64), weights, rtol=1e-5, atol=0)
    assert float(weights[0].max() / weights[0].min()) > 10  # imbalanced groups: the weights matter
    print(f"\nbackward_rows DDP ({mode}) max relative parameter error: {max(errors):.1e}")
