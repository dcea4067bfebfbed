"""``strategy=inference``: zero-shot; the training rows are the context and no weight changes."""

from __future__ import annotations

from .base import Strategy


class Inference(Strategy):
    name = "inference"
    description = "nothing: the training rows are the context"
    trains = False
    changes_weights = False
