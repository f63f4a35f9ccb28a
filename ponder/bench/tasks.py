"""Task accuracy on Spec-Bench prompts that come with references (the dev file's ``reference`` field), so lossy
methods (depth, KV, int8/q4) are judged on answers and not only on agreement with the full model:

- ``math_reasoning`` (GSM8K): **gsm8k** = 1 when the last number of the answer equals the reference's final answer
  (the number after ``####``), else 0;
- ``rag``: **containment** = the share of the reference's answer strings found in the answer (case-insensitive);
- ``translation``: **chrF** (sacrebleu's sentence chrF, 0-100) against the reference translation;
- ``summarization``: **ROUGE-L** F1 (Google's rouge-score, stemmed, 0-1) against the reference summary.

sacrebleu and rouge-score are installed with ponder's test extra; without them those two scores are left out."""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_answer(reference: str) -> float | None:
    """The final answer of a GSM8K reference solution (after ``####``)."""
    _, sep, tail = reference.rpartition("####")
    return _number(tail) if sep else None


def score(category: str, reference: Any, answer: str) -> dict[str, float]:
    """The task scores of one answer (empty when the category has no scorer or the reference no usable form)."""
    refs = reference if isinstance(reference, list) else [reference]
    if not refs:
        return {}
    if category == "math_reasoning":
        want = gsm8k_answer(str(refs[0]))
        if want is None:
            return {}
        got = _number(answer)
        return {"gsm8k": float(got is not None and abs(got - want) < 1e-6)}
    if category == "rag":
        items = [s for r in refs for s in (r if isinstance(r, list) else [r]) if isinstance(s, str) and s.strip()]
        if not items:
            return {}
        low = answer.lower()
        return {"containment": sum(s.strip().lower() in low for s in items) / len(items)}
    if category == "translation":
        try:
            import sacrebleu
        except ImportError:
            return {}
        return {"chrf": float(sacrebleu.sentence_chrf(answer, [str(r) for r in refs]).score)}
    if category == "summarization":
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            return {}
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return {"rougeL": max(scorer.score(str(r), answer)["rougeL"].fmeasure for r in refs)}
    return {}


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per score name: its mean over the records that have it and how many."""
    sums: dict[str, list[float]] = {}
    for r in records:
        for name, value in (r.get("task") or {}).items():
            sums.setdefault(name, []).append(value)
    return {name: {"mean": sum(v) / len(v), "n": len(v)} for name, v in sums.items()}
