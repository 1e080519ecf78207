"""Preference alignment: reward model, DPO, PPO, GRPO and constitutional AI (see docs/stages/align.md)."""
