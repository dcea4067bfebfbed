"""Model name -> adapter. The only place that lists the model families."""

from __future__ import annotations

from ..errors import TabTuneError
from .base import ModelAdapter
from .contexttab import ContextTabAdapter
from .mitra import MitraAdapter
from .nano import NanoAdapter
from .orion_bix import OrionBixAdapter
from .orion_msp import OrionMSPAdapter
from .tabicl import TabICLAdapter
from .tabdpt import TabDPTAdapter
from .tabpfn import TabPFNAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.name: cls for cls in (ContextTabAdapter, MitraAdapter, NanoAdapter, OrionBixAdapter, OrionMSPAdapter,
                              TabDPTAdapter, TabICLAdapter, TabPFNAdapter)}


def get_adapter(name: str) -> ModelAdapter:
    """Return the adapter for ``name`` (case-insensitive); an unknown name lists the known ones."""
    key = str(name).lower()
    if key not in ADAPTERS:
        raise TabTuneError(f"unknown model {name!r} (available: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[key]()
