"""Tokenizer: byte-level BPE training, special tokens and the chat template."""
