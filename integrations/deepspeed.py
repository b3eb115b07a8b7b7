"""DeepSpeed ZeRO 0/1/2/3: balance group gradients inside a ``DeepSpeedEngine``.

Needs the ``deepspeed`` extra (``pip install 'gradient-balancer[deepspeed]'``). Two ways in::

    engine, opt, _, _ = balancer.integrations.deepspeed.initialize(model=model, optimizer=adamw,
                                                                   config="ds.json")  # has "balancer"
    opt = Balancer(engine, plugins=["task_norm"])                     # by hand, on an engine you built

    for batch in loader:
        for name, part in batch.items():
            with opt.group(name):
                engine.backward(loss_fn(engine(part["x"]), part["y"]))
        opt.step()                                         # balances, then calls engine.step()
        opt.zero_grad()

**Mechanism.** Entering a group marks the next backward as a gradient accumulation boundary, so
DeepSpeed reduces (averages over data-parallel ranks) that group's gradient before
``engine.backward`` returns. The backend wraps the engine's ``_backward_epilogue`` (on that
engine instance only): right after DeepSpeed's own epilogue it copies the reduced gradient this
rank owns into the active group's row (adds, if the group already has one; gradients outside any
group go to an ungrouped row) and clears DeepSpeed's copy where DeepSpeed would otherwise
accumulate onto it. Rows hold only owned elements (the ZeRO-1/2/3 partition, or a ``1/W`` chunk
of the replicated stage-0 gradient), so the extra memory is ``k x`` the local partition, not
``k x`` the model. At ``opt.step()`` each rank computes the Gram matrix of its rows and one
all-reduce sums it; every rank then runs the plugins on identical numbers, writes
``ungrouped + Σ_k w_k g_k`` in place where ``engine.step()`` reads gradients (the layouts per
stage: :mod:`._deepspeed_sources`), and calls ``engine.step()``, which applies it (DeepSpeed's
clipping, if configured, clips the balanced update). Every capture event (entering a group,
stepping) is checked across ranks first, so ranks that disagree on the groups all raise
:class:`~balancer.errors.GroupMismatchError` instead of hanging.

**Rules.** One ``engine(...)`` forward per backward (ZeRO-3 needs it). ``engine.backward``, or
torch-style ``loss.backward()`` where DeepSpeed allows it (ZeRO 1-3; not with reentrant
activation checkpointing, whose per-phase epilogues would be counted twice).
``gradient_accumulation_steps`` must be 1: several backward passes inside one group block (or
re-entering a group) add up in that group. Call ``opt.step()``, never ``engine.step()`` while
gradients are captured (refused with a :class:`~balancer.errors.CaptureError`; where a framework
calls ``engine.step()`` inside its backward, as accelerate does, build the Balancer with
``balancer.integrations._hf_deepspeed.wrap_deepspeed_engine`` or
:func:`balancer.integrations.accelerate.prepare`, which defer that call to ``opt.step()``).
``opt.backward({name: loss})`` runs ``engine.backward`` per group (losses from separate
``engine(...)`` forwards; ZeRO-3 cannot backward twice through one forward), and ``model=`` is
checked against the engine's module. Not for DeepSpeed: ``opt.state_dict()`` for checkpoints
(use the engine's, below) and closures. Supported and refused configurations:
:mod:`._deepspeed_checks`.

**Checkpoints.** ``engine.save_checkpoint(dir, ...)`` stores the Balancer's plugin states and step
count in DeepSpeed's ``client_state`` under the key ``"balancer"``; ``engine.load_checkpoint(dir,
...)`` restores them (unless ``load_optimizer_states=False`` or ``load_module_only=True``) and
returns the client state without that key. The backend wraps both methods on the engine
instance (:mod:`._deepspeed_checkpoints`); the Balancer announces itself to its backend when it
is built (``Backend.attach``). Before any Balancer drives the engine, ``engine.save_checkpoint``
refuses with an error saying so rather than silently dropping the plugin state.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

from balancer import Balancer
from balancer.config import read_json_file, resolve_config
from balancer.errors import ConfigError

from ._deepspeed_backend import DeepSpeedBackend
from ._deepspeed_checkpoints import CLIENT_STATE_KEY
from ._deepspeed_checks import DeepSpeedUnsupportedError

__all__ = ["CLIENT_STATE_KEY", "DeepSpeedBackend", "DeepSpeedUnsupportedError", "initialize"]

SECTION = "balancer"  # the top-level key of the DeepSpeed config that configures the Balancer


def _ds_config(arguments: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config as a dict and the argument it came from."""
    args = arguments.get("args")
    for where, value in (
        ("config", arguments.get("config")),
        ("config_params", arguments.get("config_params")),
        ("args.deepspeed_config", getattr(args, "deepspeed_config", None)),
    ):
        if value is None:
            continue
        if isinstance(value, str | Path):
            if not Path(value).is_file():
                raise ConfigError([("", f"DeepSpeed config file `{value}` does not exist")])
            value = read_json_file(Path(value))  # every way a file can fail is a ConfigError
            if not isinstance(value, dict):
                raise ConfigError(
                    [("", f"the DeepSpeed config file must hold a JSON object; found {type(value).__name__}")]
                )
            return value, where
        if isinstance(value, dict):
            return value, where
        raise ConfigError([("", f"the DeepSpeed config must be a dict or a JSON path; found `{type(value).__name__}`")])
    raise ConfigError([("", "no DeepSpeed config given: pass config=<dict or JSON path> (as to deepspeed.initialize)")])


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Balancer, Any, Any]:
    """``deepspeed.initialize`` plus a Balancer built from the config's ``"balancer"`` section.

    Takes exactly the arguments of ``deepspeed.initialize``; the config (``config=``,
    ``config_params=`` or ``args.deepspeed_config``) is a dict or a JSON path with a top-level
    ``"balancer"`` section, read with :func:`balancer.config.resolve_config`. The section is
    validated first (a :class:`~balancer.errors.ConfigError` lists every problem before any
    engine is built), then removed from the config DeepSpeed sees: DeepSpeed 0.19 ignores unknown
    top-level keys, but it prints its config as JSON on rank 0, and a dict may hold plugin
    instances. Returns ``(engine, balancer, dataloader, lr_scheduler)``; the engine's checkpoint
    methods carry the Balancer's state.
    """
    import deepspeed

    arguments = inspect.signature(deepspeed.initialize).bind(*args, **kwargs).arguments
    config, where = _ds_config(arguments)
    if SECTION not in config:
        raise ConfigError(
            [
                (
                    SECTION,
                    f"missing from the DeepSpeed config (from {where}); "
                    f'add e.g. {{"{SECTION}": {{"plugins": ["task_norm"]}}}}',
                )
            ]
        )
    cfg, plugins = resolve_config(config)
    stripped = {k: v for k, v in config.items() if k != SECTION}
    arguments.pop("config_params", None)
    if where == "args.deepspeed_config":
        arguments["args"] = copy.copy(arguments["args"])
        arguments["args"].deepspeed_config = None
    arguments["config"] = stripped
    engine, _, dataloader, lr_scheduler = deepspeed.initialize(**arguments)
    opt = Balancer(engine, plugins, **cfg.balancer_kwargs())
    return engine, opt, dataloader, lr_scheduler
