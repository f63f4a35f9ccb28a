"""``ruler``: our own generator of four RULER tasks (Hsieh et al., arXiv 2404.06654), built to exact lengths with
the model's tokenizer, the question after the context and an answer prefix (as in ``niah``).

- ``mk``, multi-key NIAH: four "special magic number for KEY" needles with different keys; one is asked for.
- ``mv``, multi-value NIAH: four needles give the same key four different numbers; all four are asked for.
- ``vt``, variable tracking: a chain ``VAR A = 12345. VAR B = A. ...`` of five variables scattered through the
  filler; which variables hold the number.
- ``cwe``, common-word extraction: a numbered list of words in which ten words appear far more often than the
  rest; the ten most common are asked for.

A case's score is the fraction of expected strings found in the output (RULER's string match); it is correct
when all are found. Options: ``lengths=1024-2048-4096`` (context tokens, as ``niah``), ``tasks=mk-mv-vt-cwe``,
``n=2`` (cases per task and length), ``seed=0``.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

from ponder.bench.longctx import INSTRUCTION, chat_prompt, essays_text, fit, haystack_ids, insert, parse_lengths
from ponder.errors import PonderError

TASKS = ("mk", "mv", "vt", "cwe")
KEYS = ["amber-fox", "silent-river", "cobalt-owl", "rapid-stone", "quiet-maple", "golden-pike", "hollow-reed",
        "crimson-lark", "frozen-vale", "bright-moth", "lunar-wolf", "gentle-crane"]


def parse_options(spec: str) -> dict[str, Any]:
    _, *parts = spec.split(":")
    opts: dict[str, Any] = {"lengths": [1024, 2048, 4096], "tasks": list(TASKS), "n": 2, "seed": 0}
    for part in parts:
        key, eq, value = part.partition("=")
        try:
            if key == "lengths" and eq:
                opts["lengths"] = parse_lengths(value)
            elif key == "tasks" and eq and set(value.split("-")) <= set(TASKS):
                opts["tasks"] = value.split("-")
            elif key in ("n", "seed") and eq:
                opts[key] = int(value)
            else:
                raise ValueError(part)
        except ValueError:
            raise PonderError(f"bad ruler option {part!r}: use lengths=1024-2048, tasks={'-'.join(TASKS)}, n=N, seed=N")
    if opts["n"] < 1 or any(n < 512 for n in opts["lengths"]):
        raise PonderError("ruler needs n >= 1 and lengths >= 512 tokens")
    return opts


def ruler_cases(spec: str, tokenizer: Any, context_window: int, max_new: int) -> list[Any]:
    from ponder.bench.suites import Case

    opts = parse_options(spec)
    if any(n > context_window or n - max_new < 256 for n in opts["lengths"]):
        raise PonderError(f"ruler lengths must be at most the context window {context_window} and leave >= 256 "
                          f"prompt tokens after {max_new} new tokens")
    hay = haystack_ids(tokenizer, max(opts["lengths"]))
    words = _vocabulary(essays_text())
    rng = random.Random(opts["seed"])
    makers: dict[str, Callable[..., tuple[Callable[[int], str], str, str, list[str]]]] = {
        "mk": _multi_key, "mv": _multi_value, "vt": _variable_tracking, "cwe": _common_words}
    cases = []
    for length in opts["lengths"]:
        for task in opts["tasks"]:
            for i in range(opts["n"]):
                doc, question, prefix, expected = makers[task](rng, tokenizer, hay, words)
                ids = fit(lambda n: chat_prompt(tokenizer, f"{INSTRUCTION}{doc(n)}\n\nQuestion: {question}", prefix),
                          length - max_new)
                cases.append(Case(f"ruler-{task}-{length}-{i}", f"ruler-{task}", [], prompt_ids=ids,
                                  expected=expected, meta={"length": length, "task": task}))
    return cases


def _vocabulary(text: str) -> list[str]:
    return sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{5,9}\b", text)})


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _haystack(tokenizer: Any, hay: list[int], needles: list[tuple[float, str]]) -> Callable[[int], str]:
    return lambda n: insert(tokenizer.decode(hay[:n]), needles)


def _multi_key(rng, tokenizer, hay, words):
    keys = rng.sample(KEYS, 4)
    numbers = [_number(rng) for _ in keys]
    needles = [(rng.uniform(0, 100), f"The special magic number for {k} is {v}.") for k, v in zip(keys, numbers)]
    asked = rng.randrange(4)
    return (_haystack(tokenizer, hay, needles), f"What is the special magic number for {keys[asked]} mentioned in "
            "the text?", f"The special magic number for {keys[asked]} mentioned in the text is", [numbers[asked]])


def _multi_value(rng, tokenizer, hay, words):
    key = rng.choice(KEYS)
    numbers = [_number(rng) for _ in range(4)]
    needles = [(rng.uniform(0, 100), f"One of the special magic numbers for {key} is {v}.") for v in numbers]
    return (_haystack(tokenizer, hay, needles), f"What are all the special magic numbers for {key} mentioned in the "
            "text?", f"The special magic numbers for {key} mentioned in the text are", numbers)


def _variable_tracking(rng, tokenizer, hay, words):
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.uniform(0, 100) for _ in chain)
    return (_haystack(tokenizer, hay, list(zip(depths, chain))),
            f"Find all variables that are assigned the value {value} in the text above.",
            f"According to the chain of variable assignments in the text above, 5 variables are assigned the value "
            f"{value}, they are:", names)


def _common_words(rng, tokenizer, hay, words):
    common, rare = rng.sample(words, 10), rng.sample(words, 400)
    rare = [w for w in rare if w not in common]

    def doc(n: int) -> str:
        entries = max(40, n // 4)  # about four tokens per "12. word" line
        k = max(3, entries // 40)  # each common word about 4x as often as any rare one
        items = common * k + (rare * (entries // max(1, len(rare)) + 1))[: max(0, entries - 10 * k)]
        rng2 = random.Random(n)
        rng2.shuffle(items)
        return "Below is a numbered list of words.\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    return (doc, "What are the 10 most common words in the above list?",
            "The 10 most common words in the list are:", common)
