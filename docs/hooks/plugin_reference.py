"""MkDocs hooks: the source tree mkdocstrings reads, and the plugin reference.

``balancer.plugins`` and ``balancer.integrations`` are installed from the top-level ``plugins/``
and ``integrations/`` folders, which a static reader (griffe) cannot follow. This file lays
out ``build/griffe/balancer/`` as the installed package looks (symbolic links to the sources),
and ``mkdocs.yml`` points mkdocstrings there. It is written at startup, before
mkdocstrings sets up its search paths.

``docs/plugins.md`` holds the marker ``<!-- plugin-reference -->``; at build time it is replaced
by one section per plugin of ``balancer.plugins.BUILTIN_PLUGINS``: its module and class
docstrings (reStructuredText literal blocks turned into fenced code) and a table of its pydantic
options with their types, defaults, bounds and descriptions. Nothing in it is written by hand,
so the page cannot drift from the code.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"plugins": ROOT / "plugins", "integrations": ROOT / "integrations"}
MARKER = "<!-- plugin-reference -->"
_ROLE_IN_HTML = re.compile(r":(?:class|meth|func|mod|attr|data|obj|exc|paramref):(<code>)")
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"), ("max_length", "length ≤"))


def lay_out_sources() -> None:
    """Writes the package tree mkdocstrings reads; runs at startup, before any plugin's ``on_config``."""
    tree = ROOT / "build" / "griffe" / "balancer"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    for source in (ROOT / "balancer").iterdir():
        if source.name != "__pycache__":
            (tree / source.name).symlink_to(source, target_is_directory=source.is_dir())
    for name, source in PACKAGE_DIRS.items():
        (tree / name).symlink_to(source, target_is_directory=True)


def on_startup(command: str, dirty: bool) -> None:
    lay_out_sources()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, plugin_reference())


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Drops the Sphinx roles (``:class:``, ``:meth:``, ...) the docstrings use before a code span."""
    return _ROLE_IN_HTML.sub(r"\1", html)


def plugin_reference() -> str:
    from balancer.plugins import BUILTIN_PLUGINS

    return "\n\n".join(_plugin_section(cls) for cls in BUILTIN_PLUGINS) + "\n"


def _plugin_section(cls: type) -> str:
    module = sys.modules[cls.__module__]
    kinds = [kind for kind in ("update", "tap") if _overrides(cls, kind)]
    facts = [
        f"`{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}`",
        f"version `{getattr(cls, 'version', '?')}`",
        "acts on " + " and ".join(f"`{kind}`" for kind in kinds) if kinds else "",
        "needs the group losses (`opt.backward({...})`)" if getattr(cls, "needs_losses", False) else "",
    ]
    parts = [f"### `{cls.name}`", " · ".join(fact for fact in facts if fact)]
    module_doc, class_doc = inspect.getdoc(module), inspect.getdoc(cls)
    for doc in (module_doc, class_doc if class_doc != module_doc else None):
        if doc:
            parts.append(_rst_to_markdown(doc))
    parts.append(_options_table(cls))
    return "\n\n".join(parts)


def _overrides(cls: type, method: str) -> bool:
    own = getattr(cls, method, None)
    base = next((getattr(b, method) for b in cls.__mro__[1:] if b.__name__ == "Plugin" and hasattr(b, method)), None)
    return own is not None and own is not base


def _options_table(cls: type) -> str:
    options = getattr(cls, "Options", None)
    fields = getattr(options, "model_fields", {}) if options is not None else {}
    title = f"**Options** (`{options.__name__}`)" if options is not None else "**Options**"
    if not fields:
        return f"{title}: none."
    rows = ["| option | type | default | bounds | description |", "| --- | --- | --- | --- | --- |"]
    for name, field in fields.items():
        rows.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    _type_name(field.annotation),
                    _default(field),
                    _bounds(field),
                    _cell(field.description or ""),
                ]
            )
            + " |"
        )
    return f"{title}, a frozen pydantic model; unknown keys are refused.\n\n" + "\n".join(rows)


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("…" if a is Ellipsis else _type_name(a).strip("`") for a in args)
        return f"`{getattr(origin, '__name__', str(origin))}[{inner}]`"
    if annotation is type(None):
        return "`None`"
    return f"`{getattr(annotation, '__name__', str(annotation))}`"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "`None`"
    try:
        text = json.dumps(value)
    except TypeError:
        text = repr(value)
    return f"`{text}`"


def _bounds(field: Any) -> str:
    found = []
    for meta in field.metadata:
        for attr, symbol in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found) or "–"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rst_to_markdown(doc: str) -> str:
    """Docstring reStructuredText to Markdown: ``::`` literal blocks become fenced code, roles plain code."""
    doc = re.sub(r":(?:class|func|meth|attr|mod|data|obj):`~?([^`]+)`", r"`\1`", doc)
    lines, out, i = doc.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2]
        language = "python" if head.strip() in ("Example", "Examples") else "text"
        out.append(f"**{head.strip()}:**" if language == "python" else (head.rstrip() + ":" if head.strip() else ""))
        indent = len(line) - len(line.lstrip())
        block, i = [], i + 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        code = inspect.cleandoc("\n".join(block))
        out.extend(["", f"```{language}", code, "```", ""])
    return "\n".join(out)
