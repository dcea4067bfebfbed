"""Model name -> spec and adapter. The only place that lists the model families.

``SPECS`` (``models/specs/``: no torch, no model package) is what ``tabtune ls``, ``train --help`` and config
validation read; a family's adapter (``models/<name>.py``) is imported the first time it is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

from ..errors import TabTuneError
from .base import ModelAdapter, ModelSpec
from .specs.contexttab import ContextTabSpec
from .specs.mitra import MitraSpec
from .specs.nano import NanoSpec
from .specs.orion_bix import OrionBixSpec
from .specs.orion_msp import OrionMSPSpec
from .specs.tabdpt import TabDPTSpec
from .specs.tabicl import TabICLSpec
from .specs.tabpfn import TabPFNSpec

# each family: its spec, and its adapter class as "<module under tabtune_cli.models>.<class>"
FAMILIES: tuple[tuple[type[ModelSpec], str], ...] = (
    (ContextTabSpec, "contexttab.ContextTabAdapter"),
    (MitraSpec, "mitra.MitraAdapter"),
    (NanoSpec, "nano.NanoAdapter"),
    (OrionBixSpec, "orion_bix.OrionBixAdapter"),
    (OrionMSPSpec, "orion_msp.OrionMSPAdapter"),
    (TabDPTSpec, "tabdpt.TabDPTAdapter"),
    (TabICLSpec, "tabicl.TabICLAdapter"),
    (TabPFNSpec, "tabpfn.TabPFNAdapter"),
)
SPECS: dict[str, type[ModelSpec]] = {spec.name: spec for spec, _ in FAMILIES}
_ADAPTER_PATHS = {spec.name: path for spec, path in FAMILIES}


class _Adapters(Mapping):
    """name -> adapter class, each module imported on first access; the names alone import nothing."""

    def __getitem__(self, name: str) -> type[ModelAdapter]:
        module, _, cls = _ADAPTER_PATHS[name].rpartition(".")
        return getattr(import_module(f"{__package__}.{module}"), cls)

    def __contains__(self, name) -> bool:
        return name in SPECS

    def __iter__(self) -> Iterator[str]:
        return iter(SPECS)

    def __len__(self) -> int:
        return len(SPECS)


ADAPTERS: Mapping[str, type[ModelAdapter]] = _Adapters()


def _known(name: str) -> str:
    key = str(name).lower()
    if key not in SPECS:
        raise TabTuneError(f"unknown model {name!r} (available: {', '.join(sorted(SPECS))})")
    return key


def get_spec(name: str) -> ModelSpec:
    """Return the spec of model ``name`` (case-insensitive), without importing torch or the model's package;
    an unknown name lists the known ones."""
    return SPECS[_known(name)]()


def get_adapter(name: str) -> ModelAdapter:
    """Return the adapter for ``name`` (case-insensitive); an unknown name lists the known ones."""
    return ADAPTERS[_known(name)]()
