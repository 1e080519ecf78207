"""The model: one GPT file plus LoRA, quantization and HF/GGUF interop."""
