"""``import tabtune``: the name the guides use (``from tabtune import TabularPipeline``).

The engine lives in ``tabtune_cli``; this package only re-exports its public API.
"""

import tabtune_cli

__version__ = tabtune_cli.__version__
__all__ = list(tabtune_cli.__all__)


def __getattr__(name):
    if name in __all__:
        return getattr(tabtune_cli, name)
    raise AttributeError(f"module 'tabtune' has no attribute {name!r}")
