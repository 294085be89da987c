"""Serving models over HTTP: the batching engine (engine.py) and the OpenAI completions protocol (protocol.py)."""
