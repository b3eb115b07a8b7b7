"""What the options models share: refusing a setting that another option makes ignored.

The project's rule is that a setting which would be ignored is an error at construction time.
An option counts as set when its value differs from its default: a model dumped with every
field (``BalancerConfig`` round trips write all of them) must validate again.
"""

from __future__ import annotations

from collections.abc import Sequence

from balancer import PluginOptions

__all__ = ["refuse_ignored"]


def refuse_ignored(options: PluginOptions, fields: Sequence[str], when: str, fix: str) -> None:
    """Raises ``ValueError`` naming every option of ``fields`` set to a value other than its default.

    ``when`` says which other option makes them ignored (``"with rule='norm' (they belong to
    rule='prob')"``), ``fix`` what to do instead.
    """
    defaults = type(options).model_fields
    changed = [
        f"{field}={getattr(options, field)!r}" for field in fields if getattr(options, field) != defaults[field].default
    ]
    if changed:
        raise ValueError(f"{', '.join(changed)} would be ignored {when}. {fix}")
