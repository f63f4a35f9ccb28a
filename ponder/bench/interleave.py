"""``ponder bench --interleave``: every method in its own persistent process, the prompts taken in turn.

A plain bench run measures one method after another, each in its own process. On a shared or throttling machine
the speed drifts between those minutes by more than the differences being measured (20-50% within minutes on the
2-core VMs ponder is developed on), so per-category ratios of two close methods can come out either way. With
``--interleave`` every method's process starts first (one at a time: each measures its verify costs and warms up
alone) and stays up; then each prompt is run by every method before the next prompt, in an order that rotates
from prompt to prompt, so a slow spell falls on all methods alike. A method keeps its process (its peak memory is
its own) and its state across prompts (what drafters and the draft policy learn), as in a plain run. Only one
process computes at a time. Batch size 1 (a prompt at a time is the point); first turns, then second turns built
from the baseline's answers.
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import get_context
from typing import Any

from ponder.bench.methods import MethodSpec, Output
from ponder.bench.suites import Case
from ponder.errors import PonderError


def run_interleaved(
    args: argparse.Namespace, specs: list[MethodSpec], cases: list[Case], tokenizer: Any, eos: set[int], n_ctx: int,
) -> dict[str, dict[str, Any]]:
    """Each method's results (``worker.MethodRun.result``), ``baseline`` first, measured prompt by prompt in turn."""
    from tqdm import tqdm

    from ponder.bench import encode_turns

    firsts = [c for c in cases if c.turn == 1]
    seconds = [c for c in cases if c.turn == 2]
    children: dict[str, Child] = {}
    try:
        for spec in specs:
            print(f"{spec.text}: starting its process (load, verify costs, warm-up)", file=sys.stderr)
            children[spec.text] = Child(spec, args, eos, n_ctx, firsts[0].prompt_ids)
        bar = tqdm(total=len(cases) * len(specs), desc="interleaved", unit="run", file=sys.stderr)
        answers = _rounds(children, firsts, bar)
        for c in seconds:
            c.prompt_ids = encode_turns(tokenizer, c.turns, [tokenizer.decode(answers[c.id], skip_special_tokens=True)])
        _rounds(children, seconds, bar)
        bar.close()
        return {text: child.call("result") for text, child in children.items()}
    finally:
        for child in children.values():
            child.close()


def _rounds(children: dict[str, "Child"], cases: list[Case], bar: Any) -> dict[str, list[int]]:
    """Every case by every method, the order rotating by one per case; after each case (untimed), every method
    scores its output against the baseline's. The baseline's output ids by case id."""
    texts = list(children)
    answers: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        order = texts[i % len(texts):] + texts[: i % len(texts)]
        outs: dict[str, list[Output]] = {}
        for text in order:
            outs[text] = children[text].call("generate", [case])
            bar.update(1)
        base = outs["baseline"][0]
        ref = {f"{case.id}/{case.turn}": Output(base.ids, 0, 0, base.top2_gaps)}
        for text in texts:
            children[text].call("record", None if text == "baseline" else ref)
        answers[case.id] = base.ids
    return answers


class Child:
    """A method's process (``serve``): started and ready (loaded, warmed up) when constructed; ``call`` runs one
    command there and returns its answer, raising a PonderError for the method's failure or death."""

    def __init__(self, spec: MethodSpec, args: argparse.Namespace, eos: set[int], n_ctx: int,
                 warm_prompt: list[int]) -> None:
        ctx = get_context("spawn")
        self.spec = spec
        self.conn, theirs = ctx.Pipe()
        init = (spec, args.model, eos, n_ctx, args.max_new_tokens, args.batch_size, args.warmup, args.threads,
                getattr(args, "ignore_eos", False), getattr(args, "profile", False),
                (getattr(args, "temperature", 0.0), getattr(args, "seed", 0)), warm_prompt)
        self.process = ctx.Process(target=serve, args=(theirs, init))
        self.process.start()
        theirs.close()
        self._answer()  # ready

    def call(self, command: str, payload: Any = None) -> Any:
        try:
            self.conn.send((command, payload))
        except (BrokenPipeError, OSError):
            self._died()
        return self._answer()

    def _answer(self) -> Any:
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self._died()
        if status == "error":
            raise PonderError(f"method {self.spec.text} failed: {value}")
        return value

    def _died(self) -> None:
        from ponder.bench import crash_error

        self.process.join(timeout=5)
        raise crash_error(self.spec, self.process.exitcode)

    def close(self) -> None:
        try:
            self.conn.send(("stop", None))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def serve(conn: Any, init: tuple) -> None:
    """A method's process: build its ``MethodRun``, then answer ``generate`` (a list of cases: run them, keep
    the outputs for ``record`` and return them), ``record`` (the baseline's outputs or None: score the kept ones),
    ``result`` and ``stop``, each with ("ok", value) or ("error", message)."""
    try:
        _serve(conn, init)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it, quietly here
        return


def _serve(conn: Any, init: tuple) -> None:
    from ponder.bench.worker import MethodRun

    try:
        run = MethodRun(*init)
    except Exception as e:  # a peer library failing is reported, not a traceback
        conn.send(("error", _message(e)))
        return
    conn.send(("ok", None))
    kept: tuple[list[Case], list[Output], float] | None = None
    while True:
        try:
            command, payload = conn.recv()
        except EOFError:  # the parent went away
            return
        try:
            if command == "stop":
                return
            if command == "generate":
                outs, seconds = run.generate(payload)
                kept = (payload, outs, seconds)
                value: Any = outs
            elif command == "record":
                if kept is None:
                    raise PonderError("record before generate")
                run.record(*kept, payload)
                kept, value = None, None
            elif command == "result":
                value = run.result()
            else:
                raise PonderError(f"unknown command {command!r}")
        except Exception as e:
            conn.send(("error", _message(e)))
            continue
        conn.send(("ok", value))


def _message(e: Exception) -> str:
    """A method's failure in one line: a PonderError's own message, else the exception's type and message."""
    return str(e) if isinstance(e, PonderError) else f"{type(e).__name__}: {e}"
