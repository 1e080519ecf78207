"""Pretraining and mid-training: one recipe, different data mixtures."""
