"""The README's examples, and the plugin-authoring example of docs/writing-plugins.md, run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from balancer import Balancer, Registry
from balancer.contract.testing import check_plugin

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WRITING_PLUGINS = ROOT / "docs" / "writing-plugins.md"


def _python_blocks(page: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


class _TinyLM(torch.nn.Module):
    """Stands in for a model whose output has a `.loss`, as in the README."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return type("Output", (), {"loss": self.linear(x).pow(2).mean()})()


def test_usage_example_trains_two_groups():
    usage = _python_blocks()[0]
    loader = [{"math": torch.randn(4, 3), "code": torch.randn(4, 3) * 10} for _ in range(2)]
    namespace = {"model": _TinyLM(), "loader": loader}
    exec(usage, namespace)
    stats = namespace["opt"].last_stats
    assert stats.names == ("math", "code")
    contributions = stats.weights * stats.norms  # task_norm: equal contributions
    torch.testing.assert_close(contributions[0], contributions[1])


def test_plugin_authoring_example_registers_and_conforms():
    block = next(b for b in _python_blocks(WRITING_PLUGINS) if "class Clip" in b)
    namespace: dict = {}
    exec(block, namespace)
    registry = Registry()
    hooks = type("Hooks", (), {"balancer_register_plugins": staticmethod(namespace["balancer_register_plugins"])})
    registry.register_hooks(hooks)
    assert registry.get("clip_weights").plugin_class is namespace["Clip"]
    check_plugin(namespace["Clip"]())
    model = torch.nn.Linear(2, 1)
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=0.1), plugins=["clip_weights"], registry=registry)
    assert opt.plugins[0].options.max_weight == 10.0


def test_config_example():
    block = next(b for b in _python_blocks() if "from_config" in b)
    inner = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    namespace = {"Balancer": Balancer, "inner": inner}
    exec(block, namespace)
    assert namespace["opt"].plugins[0].options.alpha == 0.5
