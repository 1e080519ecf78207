"""ember: train a language model end to end, from raw text to a served, evaluated model."""

__version__ = "0.1.0"
