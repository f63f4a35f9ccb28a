"""Speculation counters count what was committed: a row that stops inside its accepted path (EOS, stop string)
counts only the drafts it used, so tau and alpha are not inflated by tokens nobody receives."""

from pathlib import Path

from ponder.engine import Engine
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator
from test_speculate_core import PROMPTS


def _steps(eng: Engine, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    """The tokens each event of a call committed (the first is the prefill's token, then one list per verify)."""
    return [e.token_ids for e in eng.stream([prompt], params)]


def test_counts_stop_at_eos_inside_an_accepted_path(tiny, tiny_dir: Path) -> None:
    eng = Engine(tiny, make_speculator(f"draft:{tiny_dir}:adaptive=false", tiny))  # drafts with the model itself
    free = SamplingParams(max_new_tokens=40, ignore_eos=True)
    steps = _steps(eng, PROMPTS[2], free)
    out = [t for s in steps for t in s]
    # an EOS that falls strictly inside a multi-token step, at its first occurrence in the output
    cut = next((i, j) for i, s in enumerate(steps[1:], 1) for j in range(len(s) - 1)
               if out.index(s[j]) == sum(map(len, steps[:i])) + j)
    eos = steps[cut[0]][cut[1]]
    eng.eos_ids = {eos}
    c = eng.generate([PROMPTS[2]], SamplingParams(max_new_tokens=40))[0]
    assert c.finish_reason == "eos" and c.output_ids == out[: out.index(eos) + 1]
    # every verify step commits its used drafts plus a bonus, except the last, which stopped on a draft
    assert c.spec.accepted == len(c.output_ids) - 1 - (c.spec.steps - 1)
    assert c.spec.accepted_by_depth[0] <= c.spec.steps and c.spec.accepted <= c.spec.drafted
