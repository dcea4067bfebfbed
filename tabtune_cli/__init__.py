"""tabtune: run, fine-tune and LoRA-tune tabular foundation models on your own table."""

__version__ = "0.1.0"

from .errors import TabTuneError  # noqa: E402
from .pipeline import TabularPipeline  # noqa: E402

__all__ = ["TabularPipeline", "TabTuneError", "__version__"]
