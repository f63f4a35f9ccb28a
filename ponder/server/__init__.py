"""``ponder serve``: an OpenAI-compatible HTTP server over the request-level engine core (``ponder.core``).

- ``loop.py``: the engine loop, a thread that owns one ``EngineCore`` and steps it; HTTP handlers submit and abort
  requests through it and receive each request's events;
- ``protocol.py``: the request bodies (pydantic) and OpenAI-shaped errors;
- ``app.py``: the FastAPI application (routes, API key, body cap, streaming as server-sent events);
- ``metrics.py``: Prometheus text; ``logprobs.py``: log-probabilities in OpenAI's shapes.
"""
