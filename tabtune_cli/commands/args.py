"""``key=value`` arguments of the commands that take no Hydra config (predict, evaluate, merge, export)."""

from __future__ import annotations

from ..errors import TabTuneError


def key_values(argv: list[str], command: str, keys: tuple[str, ...], required: tuple[str, ...] = (),
               flags: dict[str, bool] | None = None, usage: str = "") -> dict:
    """``argv`` as a dict; an unknown, repeated, empty or missing key is a one-line error naming the known keys.

    ``flags`` (name -> default) are parsed as ``true``/``false`` into booleans."""
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            what = f"unknown key {key!r}" if sep else f"expected key=value, got {item!r}"
            raise TabTuneError(f"tabtune {command}: {what} (known keys: {', '.join(keys)})")
        if key in args:
            raise TabTuneError(f"tabtune {command}: {key} given twice")
        if not value:
            raise TabTuneError(f"tabtune {command}: {key}= needs a value")
        args[key] = value
    for key in required:
        if key not in args:
            raise TabTuneError(f"tabtune {command}: {key}= is required: {usage or 'tabtune ' + command}")
    for flag, default in (flags or {}).items():
        value = args.get(flag, str(default)).lower()
        if value not in ("true", "false"):
            raise TabTuneError(f"tabtune {command}: {flag} must be true or false, got {args[flag]!r}")
        args[flag] = value == "true"
    return args
