"""Torch building blocks below the models and tuning: the low-rank maths LoRA computes with."""
