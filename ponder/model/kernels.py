"""Measure this machine's fp32 projection kernels once, and route every ``Linear`` to the fastest (``linear.py``).

For each row count in ``ROWS`` the candidates (``plain``, ``nt``, ``dnn`` where oneDNN has it, and ``packed`` from 4
rows where MKL has it) are timed on the model's own shapes: the projections of its first ``SAMPLE_LAYERS`` layers
(enough weights to leave the caches, as a decode step does), and the LM head on its own. Each row count n is then
routed to the cheapest (kernel, padded row count m >= n), taking the fewest rows within ``MARGIN`` of the cheapest;
``plain`` unpadded is kept unless another choice saves at least ``MARGIN``, so noise does not move a route. The
result is cached on disk per CPU model, thread count, PyTorch version, shapes, candidate kernels and row counts
(``$PONDER_CACHE/kernels``), so only the first process on a machine pays the measurement (~5-10 s for SmolLM2).
Processes that measure at the same time all take the first one's file: a route decides a product's last bits, and
two processes on one machine (a server and a client engine, parallel tests) must compute the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ponder.files import remove_quietly, temp_beside
from ponder.model.linear import MIN_PACKED_ROWS, Linear, can_dnn, can_pack

# row counts measured; others route to the next measured count above, and counts past the last stay on F.linear
# (prefills: transformers' kernel). Routes up to 64 rows were tried (2026-12-06, AMD EPYC: lowbit's 41-token verify
# forward 170 -> 129 ms at 800 tokens of context) and gave lowbit on held-out Spec-Bench 2.93x plain decoding
# against 2.99-3.07x without them (its planned chains grew, and drafting with them), so they are not kept
ROWS = (*range(1, 17), 24, 32)
SAMPLE_LAYERS = 6
MARGIN = 0.05
KERNELS = ("plain", "nt", "packed", "dnn")  # part of the cache key: a new candidate measures every machine again
# the most row counts a route may pack for: each is a copy of the weights (538 MB for SmolLM2's fp32 layers). On a
# Xeon (2026-12-05) the unbounded plan packed for 8 row counts and speculation's peak RSS reached 5-8 GB; the sizes
# kept are those that serve the most row counts, the others re-planned without them (part of the cache key)
MAX_PACKED = 2
Route = dict[int, tuple[str, int]]


def cpuinfo(*fields: str) -> str | None:
    """The first of these fields in /proc/cpuinfo (None where there is none, or no /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(fields):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def tune(model: Any, cache_dir: Path | None) -> dict[str, Route]:
    """Give the model's fp32 ``Linear`` layers their routes (measured, or read from ``cache_dir``) and return them
    as {"layers": route, "head": route}; a part that is not an fp32 ``Linear`` on the CPU (int8 or q4 layers, a
    quantized head, other dtypes) is left alone and absent."""
    def fp32_cpu(m: Linear) -> bool:
        return m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"

    sample = [m for layer in model.layers[:SAMPLE_LAYERS] for m in layer.modules() if isinstance(m, Linear)]
    sample = sample if sample and all(fp32_cpu(m) for m in sample) else []
    head = model.lm_head if isinstance(model.lm_head, Linear) and fp32_cpu(model.lm_head) else None
    if not sample and head is None:
        return {}
    shapes = [sorted({tuple(m.weight.shape) for m in sample}), tuple(head.weight.shape) if head else None]
    key = hashlib.sha1(json.dumps([cpu_name(), torch.get_num_threads(), torch.__version__, shapes, KERNELS,
                                   MAX_PACKED, ROWS]).encode())
    path = None if cache_dir is None else cache_dir / f"{key.hexdigest()[:16]}.json"
    routes = _read(path)
    if routes is None:
        routes = {"layers": plan(measure(sample))} if sample else {}
        if head is not None:
            routes["head"] = plan(measure([head], packed=False))
        routes = _write(path, routes)
    if sample:
        for layer in model.layers:
            for m in layer.modules():
                if isinstance(m, Linear):
                    _give_route(m, routes["layers"])
    if head is not None:
        _give_route(head, routes["head"])
    return routes


def _give_route(m: Linear, route: Route) -> None:
    """Set the route and make (or free) the oneDNN weight copy it needs."""
    m.route = dict(route)
    if any(kernel == "dnn" for kernel, _ in route.values()):
        m.prepare_dnn()
    else:
        m.dnn = None


def measure(linears: list[Linear], packed: bool = True, reps: int = 3) -> dict[tuple[str, int], float]:
    """Seconds for one pass over ``linears`` by (kernel, rows): the best of ``reps`` rounds after a warm-up round."""
    costs: dict[tuple[str, int], float] = {}
    g = torch.Generator().manual_seed(0)
    inputs = {n: {m.in_features: torch.randn(n, m.in_features, generator=g) for m in linears} for n in ROWS}
    dnn = can_dnn(linears[0].weight)
    saved_dnn = [m.dnn for m in linears]
    if dnn:
        for m in linears:
            m.prepare_dnn()
    with torch.inference_mode():
        for n in ROWS:
            kernels = ["plain", "nt"] + (["dnn"] if dnn else [])
            if packed and n >= MIN_PACKED_ROWS and can_pack(linears[0].weight):
                kernels.append("packed")
                saved = [m.packed for m in linears]
                for m in linears:
                    m.packed = {n: torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), n)}
            for rep in range(reps + 1):  # round 0 warms up; kernels alternate, so a slow moment hits them alike
                for kernel in kernels:
                    start = time.perf_counter()
                    for m in linears:
                        m.run(kernel, inputs[n][m.in_features], n)
                    if rep:
                        costs[(kernel, n)] = min(costs.get((kernel, n), float("inf")), time.perf_counter() - start)
            if "packed" in kernels:
                for m, p in zip(linears, saved):
                    m.packed = p
    for m, d in zip(linears, saved_dnn):
        m.dnn = d
    return costs


def plan(costs: dict[tuple[str, int], float]) -> Route:
    """Row count n (1..max measured) -> the cheapest (kernel, rows m >= n), the fewest rows within ``MARGIN`` of
    the cheapest; unpadded ``plain`` unless another choice is ``MARGIN`` cheaper; ``packed`` for ``MAX_PACKED`` row
    counts at most (those that serve the most row counts; the rest planned again without the others)."""
    route = _plan(costs)
    served = Counter(rows for kernel, rows in route.values() if kernel == "packed")
    if len(served) <= MAX_PACKED:
        return route
    keep = {rows for rows, _ in sorted(served.items(), key=lambda c: (-c[1], c[0]))[:MAX_PACKED]}
    return _plan({(k, rows): s for (k, rows), s in costs.items() if k != "packed" or rows in keep})


def _plan(costs: dict[tuple[str, int], float]) -> Route:
    best = {}  # measured rows -> (seconds, kernel)
    for (kernel, rows), s in costs.items():
        if rows not in best or s < best[rows][0]:
            best[rows] = (s, kernel)
    route: Route = {}
    for n in range(1, max(best) + 1):
        least = min(best[m][0] for m in best if m >= n)
        # the fewest rows within the margin of the cheapest: noise does not pad a call to many more rows
        s, rows = min(((best[m][0], m) for m in best if m >= n and best[m][0] <= least * (1 + MARGIN)),
                      key=lambda c: c[1])
        plain = costs.get(("plain", n))
        if plain is not None and plain <= s * (1 + MARGIN):
            route[n] = ("plain", n)
        else:
            route[n] = (best[rows][1], rows)
    return route


def _read(path: Path | None) -> dict[str, Route] | None:
    if path is None or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return {part: {int(n): (str(k), int(m)) for n, (k, m) in r.items()} for part, r in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError):  # AttributeError: JSON of another shape ("null")
        return None  # a damaged cache file is measured again


def _write(path: Path | None, routes: dict[str, Route]) -> dict[str, Route]:
    """Store ``routes`` unless another process stored its own first; returns the routes to use (the stored ones).
    A stored file that cannot be read (damaged) is replaced."""
    if path is None:
        return routes
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
        with open(tmp, "w") as f:
            f.write(json.dumps({part: {str(n): list(v) for n, v in r.items()} for part, r in routes.items()}))
            f.flush()
            os.fsync(f.fileno())  # whole on disk before it is published: a crash leaves no empty routes file
        try:
            os.link(tmp, path)  # fails where the file exists: the first process's routes stay
        except FileExistsError:
            stored = _read(path)
            if stored is not None:
                return stored
            os.replace(tmp, path)  # a damaged file: ours takes its place (or a process's that replaced it too)
            return _read(path) or routes
        except OSError:  # a file system without hard links: the last process's file stays, as before
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next process the measurement
    finally:
        if tmp is not None:
            remove_quietly(tmp)
    return routes
