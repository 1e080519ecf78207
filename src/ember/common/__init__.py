"""Shared plumbing: config <-> CLI, run folders and lineage, logging, checkpoints, distributed."""
