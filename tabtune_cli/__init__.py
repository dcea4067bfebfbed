"""tabtune: run, fine-tune and LoRA-tune tabular foundation models on your own table."""

__version__ = "0.1.0"

__all__ = ["TabularPipeline", "TabularLeaderboard", "TabularClassifier", "TabularRegressor", "TabTuneError",
           "__version__"]


def __getattr__(name):
    # lazy, so that `tabtune --help` and config errors answer without importing torch and peft
    if name == "TabularPipeline":
        from .pipeline import TabularPipeline

        return TabularPipeline
    if name == "TabularLeaderboard":
        from .leaderboard import TabularLeaderboard

        return TabularLeaderboard
    if name in ("TabularClassifier", "TabularRegressor"):
        from . import estimators

        return getattr(estimators, name)
    if name == "TabTuneError":
        from .errors import TabTuneError

        return TabTuneError
    raise AttributeError(f"module 'tabtune_cli' has no attribute {name!r}")
