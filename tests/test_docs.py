"""Every ``Example::`` block in the package's docstrings runs, and the runnable docs pages do too.

Docstring examples are written for a reader who already has a model, an optimizer and losses;
they run here in the namespace of the module that holds them plus a few stand-ins (a tiny
model, losses of that model, DPO log-probs), one fresh namespace per block. A line that is only
``...`` stands for the reader's own forward and backward passes: it runs one grouped backward.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from balancer import Balancer

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"balancer": "balancer", "plugins": "balancer.plugins", "integrations": "balancer.integrations"}
DOCS = ROOT / "docs"


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _example_blocks(doc: str) -> list[str]:
    """The indented block after each ``Example::`` line of one docstring."""
    lines, blocks = doc.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() not in ("Example::", "Examples::"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            body.append(follow)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def _collect() -> list[Any]:
    cases = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node, clean=False)
                if not doc:
                    continue
                for n, block in enumerate(_example_blocks(textwrap.dedent(doc))):
                    where = f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}:{n}"
                    cases.append(pytest.param(_module_name(path), block, id=where))
    return cases


EXAMPLES = _collect()


def _stand_ins() -> dict[str, Any]:
    """What the examples assume the reader already has."""
    from balancer.recipes.dpo import dpo_group_losses, tap_pairs
    from balancer.recipes.split_half import half_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def loss(scale: float) -> torch.Tensor:
        return model(scale * torch.randn(6, 4)).pow(2).mean()

    def one_step(opt: Balancer) -> None:
        """What a bare ``...`` line of an example stands for: the user's forward and backward passes."""
        opt.backward({"math": loss(1.0), "code": loss(5.0)})

    def logp() -> torch.Tensor:
        return torch.log_softmax(model(torch.randn(5, 4)), dim=-1)[:, 0]

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    return {
        "torch": torch,
        "F": F,
        "Balancer": Balancer,
        "model": model,
        "inner": inner,
        "opt": Balancer(inner),  # for examples that start from an existing Balancer
        "loss_math": loss(1.0),
        "loss_code": loss(5.0),
        "loss_depth": loss(1.0),
        "loss_seg": loss(3.0),
        "logp_w": logp(),
        "logp_l": logp(),
        "ref_w": torch.randn(5),
        "ref_l": torch.randn(5),
        "tap_pairs": tap_pairs,
        "dpo_group_losses": dpo_group_losses,
        "half_groups": half_groups,
        "half_losses": {"math": (loss(1.0), loss(1.0)), "code": (loss(4.0), loss(4.0))},
        "steps": 2,
        "_one_step": one_step,
    }


def test_every_package_example_is_found():
    assert len(EXAMPLES) >= 10  # the built-in plugins carry one each


@pytest.mark.parametrize(("module_name", "block"), EXAMPLES)
def test_docstring_example_runs(module_name: str, block: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = dict(vars(importlib.import_module(module_name)))
    namespace.update(_stand_ins())
    block = re.sub(r"^(\s*)\.\.\.\s*$", r"\1_one_step(opt)", block, flags=re.M)
    exec(compile(block, f"<{module_name} Example>", "exec"), namespace)
    if "opt" in namespace:
        assert isinstance(namespace["opt"], Balancer)


def _page_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_quickstart_page_trains_on_its_own():
    block = _page_blocks("quickstart.md")[0]
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    stats = namespace["opt"].last_stats
    assert stats.names == ("math", "code")
    torch.testing.assert_close(stats.weights * stats.norms, (stats.weights * stats.norms).flip(0))


def _reference_hook() -> Any:
    spec = importlib.util.spec_from_file_location("plugin_reference_hook", DOCS / "hooks" / "plugin_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_reference_covers_every_builtin_plugin_and_option():
    from balancer.plugins import BUILTIN_PLUGINS

    page = _reference_hook().on_page_markdown((DOCS / "plugins.md").read_text(), None, None, None)
    assert "<!-- plugin-reference -->" not in page
    for plugin in BUILTIN_PLUGINS:
        assert f"### `{plugin.name}`" in page
        for option in plugin.Options.model_fields:
            assert f"| `{option}` |" in page, (plugin.name, option)
