"""Data: corpus sources, curation steps, token shards and the resumable loader."""
