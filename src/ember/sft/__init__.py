"""Supervised fine-tuning: chat data (data.py), the `ember sft` recipe (train.py) and `ember chat` (chat.py)."""
