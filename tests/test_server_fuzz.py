"""``ponder serve`` under a schema fuzzer: schemathesis generates requests from the server's own ``/openapi.json``
(valid ones, and ones that break the schema on purpose) and checks every answer: never a 5xx, valid data accepted,
invalid data refused with a 4xx, statuses, content types and bodies as documented, the API key enforced, a 405
naming the allowed methods. The server is started by the test on 127.0.0.1 with a free port (tiny model)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from test_server import Server  # noqa: E402

KEY = "sk-fuzz"
# per operation and phase: 50 in CI (a few hundred requests in all, ~15 s on 2 cores); a bench run sets more,
# e.g. PONDER_FUZZ_EXAMPLES=200 (docs/serve.md)
EXAMPLES = int(os.environ.get("PONDER_FUZZ_EXAMPLES", "50"))


def schemathesis_cli() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if found is None:
        pytest.skip("schemathesis's command line (st) is not on PATH")
    return found


def test_the_schema_fuzzer_finds_no_failure(tiny_dir: Path, tmp_path: Path) -> None:
    st = schemathesis_cli()
    server = Server(tiny_dir, "--api-key", KEY, "--speculate", "pld")
    try:
        doc = httpx.get(server.base + "/openapi.json", timeout=10).json()
        assert doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["tiny"]
        run = subprocess.run(
            [st, "run", server.base + "/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
             "--seed", "20261203", "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "30",
             "--generation-database", "none", "--no-color", "--output-sanitize", "false"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",  # tests/fuzz_hooks.py: why
                 "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parent),
                                                           os.environ.get("PYTHONPATH", "")] if p)},
        )
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-6000:]
        assert "No issues found" in out, out[-3000:]
        print("\n" + out[-1500:])
        assert httpx.get(server.base + "/health", timeout=10).json()["status"] == "ok"  # still serving
    finally:
        assert server.stop() == 0
