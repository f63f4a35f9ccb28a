"""The OpenAPI document of ``ponder serve`` (``/openapi.json``), made to describe what the server really accepts and
answers, so that a client generator or a schema fuzzer (the tests run schemathesis against it) sees the same
contract the handlers enforce.

FastAPI derives the request bodies from the pydantic models of ``protocol``; this module adds what only the running
server knows or what pydantic cannot say: the one model name served, the token-id range of the vocabulary, the
cross-field rules (``top_logprobs`` needs ``logprobs``, ``stream_options`` needs ``stream``), the unsupported
OpenAI fields (accepted only when absent or off), and every error status with OpenAI's error object (FastAPI's
default documents a 422 that ponder never sends: its validation errors are OpenAI's 400)."""

from __future__ import annotations

import copy
from typing import Any

from ponder.server.protocol import MAX_STOPS, UNSUPPORTED

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

# the statuses each kind of route can answer besides 200 (the guard's 401/413/429/503 come before any handler)
ERRORS = {
    "/health": {},
    "/metrics": {"401": "Missing or wrong API key.", "503": "The server is shutting down."},
    "/v1/models": {"401": "Missing or wrong API key.", "503": "The server is shutting down."},
    "/tokenize": {"400": "Invalid request.", "401": "Missing or wrong API key.", "404": "Unknown model.",
                  "413": "Body over the size cap.", "503": "The server is shutting down."},
    "/detokenize": {"400": "Invalid request.", "401": "Missing or wrong API key.", "404": "Unknown model.",
                    "413": "Body over the size cap.", "503": "The server is shutting down."},
    "/v1/completions": {"400": "Invalid request (fields, ranges, a prompt longer than the context).",
                        "401": "Missing or wrong API key.", "404": "Unknown model.", "413": "Body over the size cap.",
                        "429": "The waiting queue is full (Retry-After).", "503": "The server is shutting down."},
}
ERRORS["/v1/chat/completions"] = ERRORS["/v1/completions"]

NOT_JSON_200 = {
    "/metrics": {"text/plain": {"schema": {"type": "string"}}},
    "/v1/completions": {"application/json": {"schema": {"type": "object"}},
                        # each server-sent event: a ``data:`` line holding a JSON chunk, the last one ``[DONE]``
                        "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                         "properties": {"data": {"type": "string"}}}}},
}
NOT_JSON_200["/v1/chat/completions"] = NOT_JSON_200["/v1/completions"]


def _token_ids(vocab: int, max_items: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def describe(base: dict[str, Any], model_name: str, vocab: int, context: int, speculate: str | None = None,
             kv: str | None = None, api_key: bool = False, public: tuple[str, ...] = ("/health",)) -> dict[str, Any]:
    """``base`` (FastAPI's generated document) with the server's real contract: see the module doc; ``speculate``
    and ``kv``: the server's settings, the only values a request's ``ponder`` options may name; ``api_key``:
    whether every path but ``public`` needs ``Authorization: Bearer KEY``."""
    doc = copy.deepcopy(base)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    spec_values: list[Any] = [None, False, "off", "none"] + ([True, speculate] if speculate else [])
    schemas["PonderOptions"]["properties"] = {
        "speculate": {"enum": spec_values, "description": "turn the server's speculation off for this request"},
        "kv": {"enum": [None] + ([kv] if kv else []), "description": "the server's KV policy (set per server)"}}
    schemas["Error"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    stops = {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOPS},
                       {"type": "null"}]}
    off = {"description": "not supported by ponder yet: only absent or off", "enum": [None, False, 0]}
    needs_stream = {"if": {"required": ["stream_options"],
                           "properties": {"stream_options": {"type": "object"}}},
                    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
    for name in ("CompletionRequest", "ChatRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        props["stop"] = stops
        props["seed"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, {"type": "null"}],
                         "title": "Seed"}  # pydantic writes the bound as a float, rounded past it
        for field in UNSUPPORTED:
            props[field] = off
        schemas[name]["allOf"] = [needs_stream]
    # a prompt of token ids leaves room for at least one new token; a text prompt's length shows only once encoded
    schemas["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [{"type": "string", "minLength": 1}, _token_ids(vocab, context - 1)], "title": "Prompt"}
    schemas["ChatRequest"]["allOf"].append(
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})
    for name in ("TokenizeRequest", "DetokenizeRequest"):
        schemas[name]["properties"]["model"] = {"anyOf": [{"type": "string", "enum": [model_name]},
                                                          {"type": "null"}], "title": "Model"}
    schemas["DetokenizeRequest"]["properties"]["tokens"] = _token_ids(vocab) | {"minItems": 0}
    # exactly one of prompt and messages (an explicit null counts as absent, as in the handler)
    schemas["TokenizeRequest"]["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"},
                                                "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1},
                                                  "prompt": {"type": "null"}}}]

    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, methods in doc.get("paths", {}).items():
        for op in methods.values():
            if api_key and path not in public:
                op["security"] = [{"bearer": []}]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in NOT_JSON_200:
                responses["200"]["content"] = NOT_JSON_200[path]
            for status, why in ERRORS.get(path, {}).items():
                if status == "401" and not api_key:
                    continue
                responses[status] = {"description": why,
                                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return doc
