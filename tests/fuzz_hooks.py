"""Schemathesis hooks for tests/test_server_fuzz.py (loaded by name through ``SCHEMATHESIS_HOOKS``).

The fuzzed server runs the tiny test model, whose word-level tokenizer drops whitespace: a prompt of whitespace
alone encodes to no tokens there, and the server refuses it with a 400 naming that ("the prompt is empty (it encodes
to no tokens)"), which a schema cannot state (a byte-level tokenizer, as SmolLM2's, encodes any text). Such bodies
are left out of the generated ones; every other body is kept."""

import schemathesis


@schemathesis.hook
def filter_body(ctx, body) -> bool:
    prompt = body.get("prompt") if isinstance(body, dict) else None
    return not (isinstance(prompt, str) and prompt and not prompt.split())
