"""ember: train a language model end to end, from raw text to a served, evaluated model."""

import os

# Idle intra-op threads sleep instead of spinning (libgomp reads this once, when torch loads). Spinning
# threads steal the cores that other processes need: on a busy 2-core machine a CPU training step of the
# quickstart model took 4-11 s with spinning and 1.4-1.8 s without. OMP_WAIT_POLICY=ACTIVE restores spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
