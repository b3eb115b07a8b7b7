"""Checkpoints: the Balancer's plugin states and step count ride in DeepSpeed's ``client_state``.

:func:`wrap_checkpoints` replaces ``save_checkpoint`` and ``load_checkpoint`` on one engine
instance. Saving adds ``client_state["balancer"]`` (the section of
:func:`balancer._checkpoint_section.make_balancer_section`; DeepSpeed writes it once, in the model-states
file); loading takes it out again and restores it into the Balancer. Both need the Balancer the
engine's backend belongs to, which the Balancer announces to its backend (``Backend.attach``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from balancer.errors import StateDictError

if TYPE_CHECKING:
    from balancer import Balancer

__all__ = ["CLIENT_STATE_KEY", "wrap_checkpoints"]

CLIENT_STATE_KEY = "balancer"


def wrap_checkpoints(engine: Any) -> None:
    """Wraps ``engine.save_checkpoint`` / ``load_checkpoint`` (on this instance) to carry the Balancer's state."""
    save, load = engine.save_checkpoint, engine.load_checkpoint
    load_names = list(inspect.signature(load).parameters)[1:]

    def bound() -> Balancer:
        backend = engine.__dict__["_balancer_backend"]()
        if backend is None or backend.balancer is None:
            raise StateDictError(
                "engine.save_checkpoint/load_checkpoint cannot include the Balancer's plugin state: no Balancer "
                "drives this engine yet. Build it with Balancer(engine, ...) or "
                "balancer.integrations.deepspeed.initialize(...) first."
            )
        return backend.balancer

    def save_checkpoint(
        save_dir: str, tag: Any = None, client_state: dict | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        state = dict(client_state or {})
        if CLIENT_STATE_KEY in state:
            raise StateDictError(
                f"client_state has a key {CLIENT_STATE_KEY!r}, which the Balancer uses for its own state; rename it."
            )
        opt = bound()
        state[CLIENT_STATE_KEY] = opt.balancer_state_dict()
        return save(save_dir, tag, state, *args, **kwargs)

    def load_checkpoint(load_dir: str, *args: Any, **kwargs: Any) -> Any:
        options = {**dict(zip(load_names, args, strict=False)), **kwargs}
        restore = options.get("load_optimizer_states", True) and not options.get("load_module_only", False)
        opt = bound() if restore else None
        load_path, client_state = load(load_dir, *args, **kwargs)
        if load_path is None or client_state is None:
            return load_path, client_state
        section = client_state.pop(CLIENT_STATE_KEY, None)
        if opt is not None:
            opt.load_balancer_state_dict(section)
        return load_path, client_state

    engine.__dict__.update(save_checkpoint=save_checkpoint, load_checkpoint=load_checkpoint)
