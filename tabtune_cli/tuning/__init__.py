"""Fine-tuning: episode sampling, LoRA wiring and the one training loop."""
