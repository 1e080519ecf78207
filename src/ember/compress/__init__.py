"""Compression stages: quantization, pruning, recovery fine-tuning and distillation."""
