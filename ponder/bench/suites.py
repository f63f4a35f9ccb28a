"""Prompt suites for the bench.

- ``specbench:PATH[:train|:heldout]``: the Spec-Bench jsonl format (arXiv 2401.07851), one ``{"question_id",
  "category", "turns"}`` object per line; ``:train`` keeps the questions trained drafters learn from
  (``question_id % 4 == 1``, see ``ponder.distill.data``), ``:heldout`` all the others. First
  turns always; second turns (``--second-turns``) are asked after the model's own first answer, taken from the
  baseline run.
- ``builtin``: a small prompt set of our own covering the same categories.
- ``niah``, ``ppl``, ``ruler``: long-context suites: needle in a haystack, perplexity (``ponder.bench.longctx``)
  and four RULER tasks (``ponder.bench.ruler``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ponder.errors import PonderError


@dataclass
class Case:
    """One prompt to run: a conversation's turn. ``turns`` holds the user messages up to and including this one."""

    id: str
    category: str
    turns: list[str]
    turn: int = 1  # 1-based: which user message this case asks
    prompt_ids: list[int] = field(default_factory=list)  # filled in once the tokenizer is known
    expected: str | list[str] | None = None  # the answer(s), for suites that have them (found in the output text)
    meta: dict[str, Any] = field(default_factory=dict)  # suite-specific facts (e.g. niah length and depth)


def load_suite(
    spec: str, second_turns: bool = False, tokenizer: Any = None, context_window: int = 0, max_new: int = 0
) -> list[Case]:
    """Cases of ``spec`` (``builtin``, ``specbench:PATH`` or a long-context suite), first turns first. Long-context
    suites build their prompt ids with the tokenizer, to exact lengths within the context window."""
    kind = spec.split(":")[0]
    if kind in ("niah", "ppl", "ruler"):
        from ponder.bench.longctx import niah_cases, ppl_cases
        from ponder.bench.ruler import ruler_cases

        if tokenizer is None:
            raise PonderError(f"the {kind} suite needs the model's tokenizer")
        if kind == "ppl":
            return ppl_cases(spec, tokenizer, context_window)
        return (niah_cases if kind == "niah" else ruler_cases)(spec, tokenizer, context_window, max_new)
    if spec == "builtin":
        cases = [Case(f"builtin-{i}", cat, [text]) for i, (cat, text) in enumerate(BUILTIN)]
    elif spec.startswith("specbench:"):
        path, split = spec.split(":", 1)[1], None
        if path.endswith((":train", ":heldout")):
            path, split = path.rsplit(":", 1)
        cases = _read_specbench(Path(path).expanduser())
        if split is not None:  # the split trained drafters use (``ponder.distill.data.specbench_split``)
            from ponder.distill.data import specbench_split

            cases = [c for c in cases if c.id.isdigit() and specbench_split(int(c.id)) == split]
            if not cases:
                raise PonderError(f"suite {spec!r} has no {split} questions (numeric question ids are split by % 4)")
    else:
        raise PonderError(f"unknown suite {spec!r}: use builtin, specbench:PATH (a Spec-Bench .jsonl file), niah, ruler or ppl")
    firsts = [Case(c.id, c.category, c.turns[:1], meta=dict(c.meta)) for c in cases]
    if not second_turns:
        return firsts
    return firsts + [Case(c.id, c.category, c.turns[:2], turn=2) for c in cases if len(c.turns) > 1]


def _read_specbench(path: Path) -> list[Case]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PonderError(f"cannot read suite file {path}: {e}")
    cases = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError("'turns' must be a non-empty list of strings")
            meta = {"reference": row["reference"]} if row.get("reference") else {}
            cases.append(Case(str(row["question_id"]), str(row.get("category", "uncategorized")), list(turns),
                              meta=meta))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PonderError(
                f"{path}:{n}: not a Spec-Bench record ({type(e).__name__}: {e}); each line needs "
                '{"question_id": ..., "category": ..., "turns": ["..."]}'
            )
    if not cases:
        raise PonderError(f"suite file {path} has no prompts")
    return cases


PASSAGE = (
    "The Great Barrier Reef, off the coast of Queensland, Australia, is the world's largest coral reef system. "
    "It is made of over 2,900 individual reefs and 900 islands stretching over 2,300 kilometres. The reef can be "
    "seen from outer space and is built by billions of tiny organisms known as coral polyps. It supports a wide "
    "diversity of life and was selected as a World Heritage Site in 1981. Climate change, pollution and "
    "crown-of-thorns starfish outbreaks threaten its health, and mass coral bleaching events were recorded in "
    "1998, 2002, 2016, 2017, 2020 and 2022."
)

BUILTIN: list[tuple[str, str]] = [
    ("writing", "Write a short, upbeat email inviting your team to a picnic in the park next Saturday."),
    ("writing", "Describe a lighthouse at night in four vivid sentences."),
    ("translation", "Translate German to English: Der Zug nach Berlin hat heute wegen des Schnees eine Stunde "
     "Verspätung, und viele Reisende warten in der Bahnhofshalle."),
    ("translation", "Translate French to English: La bibliothèque municipale ouvrira ses portes plus tôt le samedi "
     "afin que les étudiants puissent préparer leurs examens."),
    ("summarization", f"Summarize the following text in two sentences.\n\n{PASSAGE}"),
    ("summarization", "Summarize in one sentence: The city council met on Tuesday to discuss the new bike lanes. "
     "Residents praised the safer routes to school, while shop owners worried about losing parking spaces. "
     "The council agreed to add the lanes on two streets first and review the results after six months."),
    ("qa", "What is the boiling point of water at sea level in degrees Celsius?"),
    ("qa", "Who wrote the play Romeo and Juliet?"),
    ("math_reasoning", "A shop sells pencils at 3 for $1. How much do 27 pencils cost? Explain step by step."),
    ("math_reasoning", "Tom has 12 apples. He gives a third of them to Ann and eats 2. How many are left? "
     "Think step by step."),
    ("rag", f"Answer using the passage.\n\nPassage: {PASSAGE}\n\nQuestion: In which year did the reef become a "
     "World Heritage Site?"),
    ("rag", f"Answer using the passage.\n\nPassage: {PASSAGE}\n\nQuestion: What organisms build the reef?"),
]
