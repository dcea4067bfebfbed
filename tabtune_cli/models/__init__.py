"""Model adapters: one module per model family, all behind the protocol in ``base``."""
