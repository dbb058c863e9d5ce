"""Keeping secrets out of what `exo doctor` prints and bundles: anything named like secret/key/token.

A node may be started with `--cluster-secret S` or `--api-key K` on its command line, and its Config
holds both, so the report's node flags and the bundle's config are redacted by name, and the values
themselves are then scrubbed from every member of the bundle, in case a log line printed one. exo's own
secrets are scrubbed whatever their length (a node refuses short ones, so a bundle made after such a
refusal may hold one); a short value is scrubbed only where it stands alone, not inside other words.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_NAME = re.compile(r"secret|key|token|password|passwd|credential", re.IGNORECASE)
REDACTED = "***"
_MIN_SCRUBBED = 6  # shorter values ("1", "true") of other programs' variables would scrub innocent text
_EXO_SECRETS = ("EXO_API_KEY", "EXO_CLUSTER_SECRET", "--api-key", "--cluster-secret")


def _is_secret(name: str) -> bool:
    # `--cluster-secret-file`, EXO_CLUSTER_SECRET_FILE: a path, not the secret
    return bool(SECRET_NAME.search(name)) and not re.search(r"[-_]file$", name, re.IGNORECASE)


def _fields(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return value


def redact(value: Any) -> Any:
    """`value` (a dataclass, pydantic model, mapping, sequence or scalar) as JSON data, every field named
    like a secret replaced by "***" (an unset one stays null, which tells that it is unset)."""
    value = _fields(value)
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _is_secret(str(k)) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def redact_args(args: Iterable[str]) -> tuple[str, ...]:
    """Command-line flags with the values of secret-named ones (`--api-key K`, `--cluster-secret=S`) hidden."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg.startswith("--") and _is_secret(arg.split("=", 1)[0]):
            out.append(f"{arg.split('=', 1)[0]}={REDACTED}" if "=" in arg else arg)
            hide_next = "=" not in arg
        else:
            out.append(arg)
    return tuple(out)


def secret_values(config: Any, env: Mapping[str, str], args: Iterable[Iterable[str]] = ()) -> set[str]:
    """The values to scrub: of secret-named config fields, environment variables and flags in `args`."""
    found: set[str] = set()
    short: set[str] = set()  # exo's own, kept whatever their length

    def collect(value: Any, secret: bool, into: set[str] = found) -> None:
        value = _fields(value)
        if isinstance(value, Mapping):
            for k, v in value.items():
                collect(v, secret or _is_secret(str(k)), into)
        elif isinstance(value, list | tuple | set | frozenset):
            for v in value:
                collect(v, secret, into)
        elif secret and value is not None and not isinstance(value, bool):
            into.add(str(value))

    collect(config, False, short)  # exo's Config: every secret in it is exo's
    for name, value in env.items():
        if _is_secret(name):
            collect(value, True, short if name in _EXO_SECRETS else found)
    for flags in args:  # exo nodes' command lines
        flags = list(flags)
        for i, arg in enumerate(flags):
            name, eq, inline = arg.partition("=")
            if arg.startswith("--") and _is_secret(name):
                (short if name in _EXO_SECRETS else found).update([inline] if eq else flags[i + 1:i + 2])
    return {v for v in found if len(v) >= _MIN_SCRUBBED} | {v for v in short if v}


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SCRUBBED:
            text = text.replace(secret, REDACTED)
        else:  # a short value only where it stands alone: `--api-key abc`, `"abc"`, not inside `fabcd`
            text = re.sub(rf"(?<![\w.+/-]){re.escape(secret)}(?![\w.+/-])", REDACTED, text)
    return text
