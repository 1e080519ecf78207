"""Serving: the KV-cache generation engine (engine.py), model loading for any format (models.py), the
OpenAI-compatible HTTP API and chat page (api.py, server.py = `ember serve`, web/) and `ember export`."""
