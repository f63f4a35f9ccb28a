"""``/metrics``: the server's counters and latency histograms in Prometheus' text format (version 0.0.4).

Names follow vLLM's (``vllm:num_requests_running`` ...) under a ``ponder:`` prefix, so dashboards built for vLLM need
only the prefix changed. Everything is updated on the HTTP event loop (one thread), so no locks are needed; the
running and waiting gauges are read from the engine loop when scraped."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """The server's metrics (module doc)."""

    HISTOGRAMS = {
        "time_to_first_token_seconds": "Time from a request's arrival to its first token.",
        "inter_token_latency_seconds": "Time between a request's consecutive tokens (a multi-token event: per token).",
        "e2e_request_latency_seconds": "Time from a request's arrival to its last token.",
        "request_queue_time_seconds": "Time from a request's arrival to its prefill (admission).",
    }
    COUNTERS = {
        "prompt_tokens_total": "Prompt tokens of finished and cancelled requests.",
        "generation_tokens_total": "Generated tokens of finished and cancelled requests.",
        "request_rejected_total": "Requests refused because the queue was full (429).",
        "client_disconnects_total": "Requests cancelled because their client went away.",
        "spec_decode_num_draft_tokens_total": "Draft tokens verified (speculative decoding).",
        "spec_decode_num_accepted_tokens_total": "Draft tokens accepted (speculative decoding).",
    }

    def __init__(self) -> None:
        self.histograms = {name: Histogram() for name in self.HISTOGRAMS}
        self.counters: Counter[str] = Counter()
        self.success: Counter[str] = Counter()  # by finish reason
        self.accepted_per_pos: list[int] = []  # [d - 1]: steps that accepted a draft token at position d

    def finished(self, completion: Any, arrival: float, now: float) -> None:
        self.counters["prompt_tokens_total"] += len(completion.prompt_ids)
        self.counters["generation_tokens_total"] += len(completion.output_ids)
        self.histograms["e2e_request_latency_seconds"].observe(now - arrival)
        self.success["length" if completion.finish_reason == "length" else "stop"] += 1
        spec = completion.spec
        if spec is not None:
            self.counters["spec_decode_num_draft_tokens_total"] += spec.drafted
            self.counters["spec_decode_num_accepted_tokens_total"] += spec.accepted
            per = spec.accepted_by_depth
            self.accepted_per_pos.extend([0] * (len(per) - len(self.accepted_per_pos)))
            for d, n in enumerate(per):
                self.accepted_per_pos[d] += n

    def cancelled(self, completion: Any | None, prompt_tokens: int) -> None:
        self.counters["client_disconnects_total"] += 1
        self.counters["prompt_tokens_total"] += prompt_tokens
        if completion is not None:
            self.counters["generation_tokens_total"] += len(completion.output_ids)

    def render(self, running: int, waiting: int, extra: list[tuple[str, str, str, float]] = ()) -> str:
        """The text page; ``extra``: (name, type, help, value) read from the engine core (KV bytes, prefix
        cache)."""
        p = "ponder:"
        lines = [f"# HELP {p}num_requests_running Requests in the running batch.",
                 f"# TYPE {p}num_requests_running gauge", f"{p}num_requests_running {running}",
                 f"# HELP {p}num_requests_waiting Requests waiting for a place in the batch (or being prefilled).",
                 f"# TYPE {p}num_requests_waiting gauge", f"{p}num_requests_waiting {waiting}"]
        for name, kind, help_, value in extra:
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
        for name, help_ in self.COUNTERS.items():
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter", f"{p}{name} {self.counters[name]}"]
        lines += [f"# HELP {p}request_success_total Finished requests by finish reason.",
                  f"# TYPE {p}request_success_total counter"]
        lines += [f'{p}request_success_total{{finished_reason="{r}"}} {self.success[r]}' for r in ("stop", "length")]
        lines += [f"# HELP {p}spec_decode_num_accepted_tokens_per_pos Accepted draft tokens by draft position.",
                  f"# TYPE {p}spec_decode_num_accepted_tokens_per_pos counter"]
        lines += [f'{p}spec_decode_num_accepted_tokens_per_pos{{position="{d}"}} {n}'
                  for d, n in enumerate(self.accepted_per_pos)]
        for name, help_ in self.HISTOGRAMS.items():
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram"]
            lines += self.histograms[name].lines(p + name)
        return "\n".join(lines) + "\n"
