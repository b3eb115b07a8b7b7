"""Multi-rank test harness: 2 CPU processes under torchrun (gloo), with a timeout.

``--standalone`` lets the rendezvous pick a free port itself, so concurrent launches cannot
race for one.

A hang fails the test instead of blocking CI: the whole process group of the launch is killed
when the timeout expires.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children first."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            queue.extend(children)
    return found


def _kill_tree(pid: int) -> None:
    for victim in [*_descendants(pid), pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Launch:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def __call__(
        self, script: str, *args: str, nprocs: int = 2, timeout: float = 240, expect_failure: bool = False
    ) -> subprocess.CompletedProcess[str]:
        path = self.tmp_path / "rank_script.py"
        path.write_text(textwrap.dedent(script))
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc_per_node={nprocs}",
            str(path), str(self.tmp_path), *args,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)  # torchrun starts each worker in a session of its own: killpg misses them
            out, _ = proc.communicate()
            pytest.fail(f"multi-rank run timed out after {timeout}s (a hang?); output:\n{out[-4000:]}")
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, None)
        if not expect_failure and proc.returncode != 0:
            pytest.fail(f"multi-rank run failed with exit code {proc.returncode}; output:\n{out[-6000:]}")
        return result


@pytest.fixture
def launch(tmp_path: Path) -> Launch:
    """``launch(script, *args)`` runs ``script`` on 2 ranks; ``sys.argv[1]`` is a shared temp folder."""
    return Launch(tmp_path)


@pytest.fixture(scope="module")
def launch_once(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """A :class:`Launch` in a module-scoped folder: one multi-rank run that many tests read."""
    return Launch(tmp_path_factory.mktemp("multi_rank"))
