"""Reading a JSON config file (a DeepSpeed config or a ``balancer`` section on its own).

Every way reading can fail (missing, unreadable, not UTF-8, not JSON, too deep, a repeated key)
is a :class:`~balancer.errors.ConfigError` that names the file.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from balancer.errors import ConfigError

__all__ = ["read_json_file"]


def read_json_file(path: Path) -> Any:
    """The JSON value in the file at ``path``; every way it can fail is a ConfigError naming the file."""
    repeated: list[str] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        repeated.extend(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        return dict(pairs)

    def fail(problem: str) -> ConfigError:
        return ConfigError([("", f"config file `{path}` {problem}")])

    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise fail("does not exist") from None
    except OSError as exc:
        raise fail(f"cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise fail(
            f"is not JSON text: byte {exc.start} cannot be decoded as {exc.encoding}; save it as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise fail(f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise fail(
            f"nests lists or objects too deeply to read (about {sys.getrecursionlimit()} levels or more)"
        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise fail(f"is not valid JSON: {exc}") from None
    if repeated:
        found = ", ".join(f"`{key}`" for key in repeated)
        raise fail(f"repeats the key(s) {found} in one object (JSON would keep only the last); write each key once")
    return data
