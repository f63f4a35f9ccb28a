"""KV-cache compression: exact no-ops, what each policy keeps (checked against scores computed here, naively),
decoding through a compressed cache equals full-cache attention restricted to the kept entries, decode-time
eviction bounds, and speculative decoding on top of a policy is lossless relative to the same policy without it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.kv import make_policy, policy_names
from ponder.kv.base import KVHook
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator

PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 20, 21, 22, 23, 24, 25, 26, 27, 5, 6, 7, 8, 9, 30, 31, 32, 33],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4],
    [11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 40, 41, 42],
]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def policy_table() -> dict[str, list[str]]:
    """Concrete SPECs per registered policy (a new policy without an entry fails the tests)."""
    return {
        "streaming": ["streaming:ratio=0.5", "streaming:budget=12:chunk=4:sinks=2"],
        "h2o": ["h2o:ratio=0.5", "h2o:budget=12:chunk=4:recent=0.25"],
        "snapkv": ["snapkv:ratio=0.5:window=4:kernel=3", "snapkv:budget=10:window=4:kernel=5:gqa=mean:pool=avg"],
        "tokenselect": ["tokenselect:ratio=0.5:window=4:sinks=1", "tokenselect:budget=12:window=4:reuse=0.5"],
        "quant": ["quant:group=8:residual=4", "quant:bits=4:group=4:residual=2"],
    }
EVICTING = [s for k, v in policy_table().items() if k not in ("tokenselect", "quant") for s in v]
# uneven budgets over layers/heads (storage padded to the largest share, so not always smaller than the full cache)
ALLOC = ["snapkv:ratio=0.5:window=4:kernel=3:alloc=ada", "snapkv:budget=12:window=2:kernel=1:alloc=pyramid-ada:beta=4:floor=0",
         "snapkv:ratio=0.6:window=2:kernel=3:alloc=pyramid:beta=3"]
SPECULATING = EVICTING + ALLOC + policy_table()["quant"]


def test_every_policy_has_specs() -> None:
    assert set(policy_table()) == set(policy_names())


@pytest.mark.parametrize("name", sorted(set(policy_table()) - {"quant"}))
def test_ratio_zero_and_large_budget_are_exact_noops(tiny, name: str) -> None:
    plain = [c.output_ids for c in Engine(tiny).generate(PROMPTS, GREEDY)]
    for spec in (name, f"{name}:ratio=0", f"{name}:budget=200"):
        out = Engine(tiny, kv=make_policy(spec)).generate(PROMPTS, GREEDY)
        assert [c.output_ids for c in out] == plain, spec


@pytest.mark.parametrize("spec", ["streaming", "h2o", "snapkv:window=4:kernel=3"])
def test_compress_removes_nothing_at_ratio_zero_or_a_budget_of_the_prompt(tiny, spec: str) -> None:
    """The engine skips no-op policies (``is_noop``), so the test above never reaches their own arithmetic: drive
    ``compress`` itself. Ratio 0 and a budget of exactly the prompt keep every entry bit for bit; one entry less
    removes exactly one, so an off-by-one in the kept-entries formula fails here."""
    n = len(PROMPTS[0])
    for amount in ("ratio=0", f"budget={n}"):
        full, comp, _ = _prefill(tiny, PROMPTS[0], make_policy(f"{spec}:{amount}"))
        assert (comp.lengths, comp.evicted, comp.holes) == ([n], [0], None), amount
        assert all(torch.equal(a, b) for a, b in zip(full.k + full.v, comp.k + comp.v)), amount
    _, comp, _ = _prefill(tiny, PROMPTS[0], make_policy(f"{spec}:budget={n - 1}"))
    assert (comp.lengths, comp.evicted) == ([n - 1], [1])


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv", "tokenselect"])
def test_noop_boundaries(name: str) -> None:
    """``is_noop`` lets the engine skip a policy: true exactly when nothing would ever be removed, i.e. ratio 0 or a
    budget covering the prompt (plus the new tokens, for policies that evict or select while decoding)."""
    n, new = 30, 10
    reach = n + new if name in ("streaming", "h2o", "tokenselect") else n
    assert make_policy(f"{name}:ratio=0").is_noop(n, new)
    assert make_policy(f"{name}:budget={reach}").is_noop(n, new)
    assert not make_policy(f"{name}:budget={reach - 1}").is_noop(n, new)
    assert not make_policy(f"{name}:ratio=0.01").is_noop(n, new)


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_decode_eviction_starts_exactly_at_cap_plus_chunk(tiny, name: str) -> None:
    """A budget of the prompt removes nothing at prefill; decoding then grows the row to ``cap + chunk - 1``
    entries untouched and evicts back to ``cap`` on the step that reaches ``cap + chunk``, every ``chunk`` steps."""
    model, prompt, chunk = tiny.model, PROMPTS[0], 4
    n = len(prompt)
    policy = make_policy(f"{name}:budget={n}:chunk={chunk}")
    cache = model.new_cache(1, n + 2 * chunk)
    hook = policy.prefill_hook(len(cache.k), n)
    lengths, token = [], 7
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache, kv_hook=hook)
        states = [policy.compress(cache, hook)]
        assert cache.lengths == [n]
        for _ in range(2 * chunk):
            step = policy.decode_hook(states, cache)
            token = int(model(torch.tensor([[token]]), cache, kv_hook=step)[0, -1].argmax())
            policy.after_step(cache, states, step)
            lengths.append(cache.lengths[0])
    assert lengths == [n + 1, n + 2, n + 3, n, n + 1, n + 2, n + 3, n]
    assert cache.evicted == [2 * chunk]


@pytest.mark.parametrize("spec", EVICTING)
def test_compression_changes_the_cache_and_counts_positions(tiny, spec: str) -> None:
    eng = Engine(tiny, kv=make_policy(spec))
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert all(len(c.output_ids) == 30 for c in out)
    full = Engine(tiny)
    full.generate(PROMPTS, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert eng.kv_bytes < full.kv_bytes  # smaller tensors, not a mask


# --- what is kept -----------------------------------------------------------------------------------------------
class Recorder(KVHook):
    """Keeps each layer's queries and keys of a one-row prefill."""

    def __init__(self) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}

    def observe(self, layer, q, keys, ctx) -> None:
        self.q[layer], self.k[layer] = q[0].double(), keys[0].double()  # [T, H, D], [Hkv, S, D]


def _prefill(tiny, prompt: list[int], policy=None):
    """(full cache, compressed cache or None, recorder) of one prompt."""
    model = tiny.model
    rec = Recorder()
    full = model.new_cache(1, len(prompt))
    with torch.inference_mode():
        model(torch.tensor([prompt]), full, kv_hook=rec)
    if policy is None:
        return full, None, rec
    comp = model.new_cache(1, len(prompt))
    hook = policy.prefill_hook(len(comp.k), len(prompt))
    with torch.inference_mode():
        model(torch.tensor([prompt]), comp, kv_hook=hook)
        policy.compress(comp, hook)
    return full, comp, rec


def kept_slots(full, comp, layer: int) -> list[list[int]]:
    """Per KV head, which full-cache slots the compressed cache holds (found by matching key vectors)."""
    out = []
    for h in range(full.k[layer].shape[1]):
        fk, ck = full.k[layer][0, h, : full.lengths[0]], comp.k[layer][0, h, : comp.lengths[0]]
        if comp.holes is not None:
            ck = ck[~comp.holes[layer][0, h, : comp.lengths[0]]]
        match = (ck[:, None, :] == fk[None, :, :]).all(-1)  # [n_kept, S]
        assert (match.sum(1) == 1).all()
        out.append(match.float().argmax(1).tolist())
    return out


def naive_probs(rec: Recorder, layer: int) -> torch.Tensor:
    """Causal attention probabilities # [H, T, S] from recorded queries and keys, in float64."""
    q, k = rec.q[layer], rec.k[layer]
    T, H, D = q.shape
    kk = k.repeat_interleave(H // k.shape[0], 0)  # [H, S, D]
    logits = torch.einsum("thd,hsd->hts", q, kk) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _check_top(scores: torch.Tensor, kept: list[list[int]], forced: set[int]) -> None:
    """Every kept (non-forced) entry scores at least as high as every evicted one, per KV head."""
    S = scores.shape[1]
    for h, slots in enumerate(kept):
        free = [s for s in slots if s not in forced]
        evicted = [s for s in range(S) if s not in slots]
        assert forced <= set(slots)
        if free and evicted:
            assert scores[h, free].min() >= scores[h, evicted].max() - 1e-9


def test_streaming_keeps_sinks_and_window(tiny) -> None:
    prompt = PROMPTS[0]
    full, comp, _ = _prefill(tiny, prompt, make_policy("streaming:budget=10:sinks=3"))
    assert comp.lengths == [10] and comp.evicted == [len(prompt) - 10]
    for layer in range(len(full.k)):
        for slots in kept_slots(full, comp, layer):
            assert slots == [0, 1, 2] + list(range(len(prompt) - 7, len(prompt)))


def test_snapkv_keeps_the_highest_window_votes(tiny) -> None:
    prompt, w, kernel = PROMPTS[1], 4, 3
    full, comp, rec = _prefill(tiny, prompt, make_policy(f"snapkv:budget=12:window={w}:kernel={kernel}:sinks=1"))
    S = len(prompt)
    for layer in range(len(full.k)):
        probs = naive_probs(rec, layer)[:, S - w :].sum(1)  # [H, S] votes of the window
        H, Hkv = probs.shape[0], full.k[layer].shape[1]
        votes = probs.view(Hkv, H // Hkv, S).amax(1)  # gqa=max
        pooled = torch.stack([votes[:, max(0, i - kernel // 2) : i + kernel - kernel // 2].amax(1) for i in range(S)], 1)
        _check_top(pooled, kept_slots(full, comp, layer), {0} | set(range(S - w, S)))


def test_h2o_keeps_the_heavy_hitters(tiny) -> None:
    prompt = PROMPTS[0]
    full, comp, rec = _prefill(tiny, prompt, make_policy("h2o:budget=16:recent=0.25"))
    S = len(prompt)
    for layer in range(len(full.k)):
        probs = naive_probs(rec, layer).sum(1)  # [H, S]: attention each key received from all queries
        Hkv = full.k[layer].shape[1]
        received = probs.view(Hkv, -1, S).mean(1)  # gqa=mean
        _check_top(received, kept_slots(full, comp, layer), set(range(S - 4, S)))


@pytest.mark.parametrize("spec", ["streaming:budget=12:sinks=2", "snapkv:budget=12:window=4:kernel=3",
                                  "h2o:budget=14:recent=0.5"] + ALLOC)
def test_decoding_equals_full_attention_over_the_kept_entries(tiny, spec: str) -> None:
    """The compressed cache's logits equal a full cache whose attention hides, per layer and KV head, the evicted
    entries: so selection, packing and the positions of new tokens are all right."""
    model, prompt = tiny.model, PROMPTS[0]
    policy = make_policy(spec)
    full, comp, _ = _prefill(tiny, prompt, policy)
    kept = [kept_slots(full, comp, layer) for layer in range(len(full.k))]
    full.ensure(len(prompt) + 8)
    comp.ensure(comp.lengths[0] + 8)
    token = 7
    with torch.inference_mode():
        for step in range(6):
            got = model(torch.tensor([[token]]), comp)[0, -1]
            want = _masked_step(model, full, token, kept, len(prompt), step)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token = int(got.argmax())


def _masked_step(model, cache, token: int, kept: list[list[list[int]]], n_prompt: int, step: int) -> torch.Tensor:
    """One decode step on the full cache, each layer's attention restricted to the kept prompt entries (per KV
    head) plus every decoded token."""
    ctx = model.step_context(cache, 1, [1])
    ctx.queries = ctx.plan = None  # attend under ctx.mask (set below), not by the invariant path's own slot ranges
    S = cache.lengths[0] + 1
    h = model.embed(torch.tensor([[token]]))
    for layer in range(len(model.layers)):
        mask = torch.zeros(1, len(kept[layer]), 1, S, dtype=torch.bool, device=model.device)
        for head, slots in enumerate(kept[layer]):
            mask[0, head, 0, slots] = True
        mask[..., n_prompt:] = True
        ctx.mask = mask
        h = model.run_layers(h, ctx, cache, layer, layer + 1)
    cache.advance([1])
    return model.logits(h)[0, -1]


def test_decode_eviction_bounds_the_cache(tiny) -> None:
    for spec in ("streaming:budget=12:chunk=4", "h2o:budget=12:chunk=4"):
        eng = Engine(tiny, kv=make_policy(spec))
        out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=40, ignore_eos=True))
        assert all(len(c.output_ids) == 40 for c in out)
        # the batch cache holds cap + chunk (+ nothing else) slots, while each row saw over 60 tokens
        assert eng.kv_bytes == Engine(tiny).model.new_cache(3, 16).nbytes()


# --- composition with speculative decoding ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speculators(tiny, tiny_dir, cyclic, cyclic_head_dir, cyclic_medusa_dir) -> dict:
    """Built once: each measures its verify-cost curve when first used, which dominates a tiny model's runs.
    Early exit runs on the cyclic model (tests/cyclic_model.py), whose first layer's exit head agrees with the full
    model: on the random one it drafts nothing, and its reused hidden states would never meet the policy (the head
    and Medusa heads are trained on it, tests/conftest.py). Drafting
    is forced on (adaptive=false): these speculators serve many calls, and the policy's gate, which times steps,
    may stop drafting on a busy machine."""
    specs = {"pld+recycling:adaptive=false:min_prob=0": tiny, f"draft:{tiny_dir}:adaptive=false": tiny,
             "early-exit:layer=1:adaptive=false": cyclic,
             # the target's q4 copy drafts over the policy's cache (writes above each row's length, then cut back)
             "lowbit:adaptive=false": cyclic,
             # the trained drafters read the hidden states of the verify forward through the policy's hooks
             f"head:{cyclic_head_dir}:adaptive=false": cyclic, f"medusa:{cyclic_medusa_dir}:adaptive=false": cyclic}
    return {s: (target, make_speculator(s, target)) for s, target in specs.items()}


@pytest.mark.parametrize("kv", SPECULATING)
def test_speculation_is_lossless_relative_to_the_policy(speculators, kv: str) -> None:
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        want = {}  # per target model: plain decoding through the same policy
        for spec, (target, speculator) in speculators.items():
            if id(target) not in want:
                want[id(target)] = [c.output_ids for c in Engine(target, kv=make_policy(kv)).generate(prompts, params)]
            out = Engine(target, speculator, make_policy(kv)).generate(prompts, params)
            assert [c.output_ids for c in out] == want[id(target)], (kv, spec, len(prompts))
            if spec.startswith(("draft", "early-exit", "head", "medusa", "lowbit")):
                assert sum(c.spec.accepted for c in out) > 0  # drafts really were accepted through the policy


def test_tokenselect_with_speculation_is_refused(tiny) -> None:
    with pytest.raises(PonderError, match="does not compose with speculative decoding"):
        Engine(tiny, make_speculator("pld", tiny), make_policy("tokenselect:ratio=0.5"))


class NaiveTokenSelect(KVHook):
    """TokenSelect computed independently, for one row: per KV head, the softmax of each query head summed over
    the group; attention is masked (not gathered) to the top entries plus sinks and window. With ``reuse`` (a
    cosine threshold) the older entries chosen at the previous step are kept while consecutive queries' mean cosine
    over the heads is at least ``reuse`` and their count is unchanged; ``votes`` counts the selections computed."""

    def __init__(self, ratio: float, sinks: int, window: int, budget: int | None = None,
                 reuse: float | None = None) -> None:
        self.ratio, self.sinks, self.window, self.budget, self.reuse = ratio, sinks, window, budget, reuse
        self.prev: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # layer -> (query, older slots per head)
        self.votes = 0
        self.cosines: list[float] = []

    def select(self, layer, q, keys, values, ctx):
        import dataclasses

        _, _, H, D = q.shape
        Hkv, S = keys.shape[1], keys.shape[2]
        n = (ctx.row_read or [S])[0]
        k = min(n, self.budget) if self.budget is not None else max(1, min(n, int(n * (1 - self.ratio))))
        local = min(n, self.window)
        sinks = min(self.sinks, n - local)
        free = k - local - sinks
        older = self._older(layer, q[0, 0].double(), keys[0].double(), n, sinks, local, free) if k < n else []
        mask = torch.zeros(1, Hkv, 1, S, dtype=torch.bool, device=keys.device)
        mask[0, :, 0, :n] = k >= n
        for h, top in enumerate(older):
            mask[0, h, 0, :sinks] = True
            mask[0, h, 0, n - local : n] = True
            mask[0, h, 0, top] = True
        return keys, values, dataclasses.replace(ctx, mask=mask, row_read=None)

    def _older(self, layer: int, q: torch.Tensor, keys: torch.Tensor, n: int, sinks: int, local: int, free: int):
        H, D = q.shape
        Hkv = keys.shape[0]
        prev = self.prev.get(layer)
        if self.reuse is not None and prev is not None and len(prev[1][0]) == free:
            cos = torch.nn.functional.cosine_similarity(q, prev[0], dim=-1).mean().item()
            self.cosines.append(cos)
            if cos >= self.reuse:
                self.prev[layer] = (q, prev[1])
                return prev[1]
        self.votes += 1
        probs = torch.einsum("hd,hsd->hs", q, keys.repeat_interleave(H // Hkv, 0)[:, :n])
        votes = (probs / math.sqrt(D)).softmax(-1).view(Hkv, H // Hkv, n).sum(1)
        older = [votes[h, sinks : n - local].topk(free).indices + sinks for h in range(Hkv)]
        self.prev[layer] = (q, older)
        return older


def _naive_decode(model, prompt: list[int], hook: KVHook, steps: int) -> list[int]:
    """Greedy decoding of one prompt on the full cache, every decode step's attention through ``hook``."""
    cache = model.new_cache(1, len(prompt) + steps)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache)[0, -1]
        out = [int(logits.argmax())]
        for _ in range(steps - 1):  # the last token needs no forward
            out.append(int(model(torch.tensor([[out[-1]]]), cache, kv_hook=hook)[0, -1].argmax()))
    return out


def test_tokenselect_attends_to_the_soft_vote_winners(tiny) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    got = Engine(tiny, kv=make_policy("tokenselect:ratio=0.5:window=4:sinks=1:reuse=2")).generate(PROMPTS, params)
    # reference: plain decoding through a hook that masks the full cache to the naive selection
    for prompt, c in zip(PROMPTS, got):
        assert c.output_ids == _naive_decode(tiny.model, prompt, NaiveTokenSelect(0.5, 1, 4), 12)
    full = [c.output_ids for c in Engine(tiny).generate(PROMPTS, params)]
    assert [c.output_ids for c in got] != full  # the selection really changed what was attended


def test_tokenselect_reuses_its_selection_while_queries_stay_similar(tiny, monkeypatch) -> None:
    """The selection cache: the engine computes a selection (``Selector._vote``) only when consecutive queries
    differ (cosine below ``reuse``), and decodes what a naive selection with the same rule decodes. reuse=-1 keeps
    each row's first selection, reuse=2 never reuses, reuse=0 (on this model) sometimes; all three differ."""
    from ponder.kv.tokenselect import Selector

    votes: list[int] = []
    vote = Selector._vote
    monkeypatch.setattr(Selector, "_vote", staticmethod(lambda *a: votes.append(1) or vote(*a)))
    params, layers, steps = SamplingParams(max_new_tokens=12, ignore_eos=True), tiny.model.config.num_hidden_layers, 12
    outputs, counts = {}, {}
    for reuse in (-1.0, 0.0, 2.0):
        votes.clear()
        got = Engine(tiny, kv=make_policy(f"tokenselect:budget=12:window=4:sinks=1:reuse={reuse}")).generate(PROMPTS, params)
        outputs[reuse], counts[reuse] = [c.output_ids for c in got], len(votes)
        naive = [NaiveTokenSelect(0.0, 1, 4, budget=12, reuse=reuse) for _ in PROMPTS]
        assert outputs[reuse] == [_naive_decode(tiny.model, p, h, steps) for p, h in zip(PROMPTS, naive)], reuse
        assert counts[reuse] == sum(h.votes for h in naive), reuse  # selections computed: the same steps
        assert all(abs(c - reuse) > 1e-4 for h in naive for c in h.cosines)  # no threshold straddled by rounding
    rows_layers = len(PROMPTS) * layers
    assert counts[-1.0] == rows_layers  # one selection per row and layer (the first decode step), then reused
    assert counts[2.0] == rows_layers * (steps - 1)  # every decode step (the first token comes from prefill)
    assert counts[-1.0] < counts[0.0] < counts[2.0]
    assert outputs[-1.0] != outputs[0.0] != outputs[2.0] != outputs[-1.0]  # reuse really changed what was attended


# --- quantization ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_within_half_a_step(bits: int) -> None:
    from ponder.kv.quant import pack4, quantize, unpack4

    x = torch.randn(3, 40, 16) * torch.linspace(0.1, 5, 16)  # channels of very different ranges, like keys
    for dim in (1, -1):
        codes, scale, zero = quantize(x, bits, dim)
        if bits == 4:
            assert torch.equal(unpack4(pack4(codes)), codes) and pack4(codes).shape[-1] == 8
        err = (codes.float() * scale + zero - x).abs()
        assert (err <= scale / 2 + 1e-6).all()
        assert codes.max() <= 2**bits - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_reads_back_within_the_bound(tiny, bits: int) -> None:
    """A prompt copied into the quantized cache reads back within half a step per element (keys per channel and
    group, values per token), with the residual exact; the bytes are the tensors' bytes."""
    from ponder.kv.quant import Quant, QuantOptions

    prompt = PROMPTS[0] * 2
    full, _, _ = _prefill(tiny, prompt)
    o = QuantOptions(bits=bits, group=8, residual=4)
    cache = Quant(o).new_cache(tiny.model, 1, len(prompt) + 4, 0)
    cache.copy_row(0, full)
    n, q = len(prompt), cache.base[0]
    assert q == (n - 4) // 8 * 8 and q > 0
    for layer in range(len(full.k)):
        keys, values = cache._read(layer, n)
        fk, fv = full.k[layer][0, :, :n], full.v[layer][0, :, :n]
        assert torch.equal(keys[0, :, q:], fk[:, q:]) and torch.equal(values[0, :, q:], fv[:, q:])
        kg = fk[:, :q].reshape(fk.shape[0], q // 8, 8, -1)
        kstep = (kg.amax(2) - kg.amin(2)) / (2**bits - 1)  # [Hkv, groups, D]
        kerr = (keys[0, :, :q] - fk[:, :q]).abs().reshape_as(kg)
        assert (kerr <= kstep[:, :, None] / 2 + 1e-5).all()
        vstep = (fv[:, :q].amax(-1) - fv[:, :q].amin(-1)) / (2**bits - 1)
        assert ((values[0, :, :q] - fv[:, :q]).abs() <= vstep[..., None] / 2 + 1e-5).all()
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in cache._tensors())


def test_kv_bytes_of_int8_and_int4_at_smollm2_shapes() -> None:
    """SmolLM2's KV shape (3 KV heads of 64 dims), 4 rows of 2048 slots: int8 at most half of fp32 (codes, scales
    and the residual counted), int4 well under int8."""
    from ponder.cache import KVCache
    from ponder.kv.quant import QuantKVCache, QuantOptions

    full = KVCache(2, 4, 3, 2048, 64)
    q8 = QuantKVCache(2, 4, 3, 2048, 64, torch.float32, "cpu", QuantOptions(bits=8), 0)
    q4 = QuantKVCache(2, 4, 3, 2048, 64, torch.float32, "cpu", QuantOptions(bits=4), 0)
    assert q8.nbytes() <= 0.5 * full.nbytes()
    assert q4.nbytes() <= 0.75 * q8.nbytes()


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["bogus", "snapkv:ratio=1", "snapkv:ratio=-0.1", "snapkv:budget=0",
                                  "snapkv:ratio=0.5:budget=10", "snapkv:window=0", "snapkv:pool=median",
                                  "h2o:recent=2", "streaming:chunk=0", "snapkv:nope=1", "snapkv:window=x",
                                  "snapkv:0.5", "quant:bits=3", "quant:ratio=0.5", "quant:group=0"])
def test_bad_policy_specs_are_one_line_errors(spec: str) -> None:
    with pytest.raises(PonderError) as e:
        make_policy(spec)
    assert "\n" not in str(e.value)


def test_smooth_is_a_centered_max_pool() -> None:
    from ponder.kv.base import smooth

    x = torch.tensor([[0.0, 0, 5, 0, 0, 0, 1]])
    assert smooth(x, 3).tolist() == [[0, 5, 5, 5, 0, 1, 1]]
    assert torch.allclose(smooth(x, 3, "avg"), F.avg_pool1d(F.pad(x[:, None], (1, 1), mode="replicate"), 3, 1)[:, 0])


# --- budget allocation across layers and heads ----------------------------------------------------------------------
def test_pyramid_layer_budgets_fall_and_average_the_budget() -> None:
    from ponder.kv.alloc import layer_budgets

    for kept, n, layers, beta, least in [(100, 400, 30, 20, 8), (300, 400, 30, 20, 8), (7, 9, 4, 2, 3), (50, 60, 1, 20, 4)]:
        b = layer_budgets(kept, n, layers, "pyramid", beta, least)
        assert sum(b) == layers * kept
        assert all(x >= y for x, y in zip(b, b[1:]))  # bottom layers keep more
        assert min(b) >= least and max(b) <= n
    assert layer_budgets(100, 400, 30, "uniform", 20, 8) == [100] * 30
    b = layer_budgets(100, 400, 30, "pyramid", 20, 8)
    assert b[-1] <= 100 / 20 + 8 and b[0] >= 190  # the paper's shape: top kept/beta (at least the forced), bottom ~2x


def test_ada_shares_a_layer_budget_by_score_with_a_floor() -> None:
    from ponder.kv.alloc import head_counts, keep_counts

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        Hkv, S, budget = 4, 50, 10 + trial
        scores = torch.rand(Hkv, S, generator=gen) * torch.rand(Hkv, 1, generator=gen) * 10  # unevenly peaked heads
        forced = torch.zeros(S, dtype=torch.bool)
        forced[:2] = forced[-3:] = True
        floor = 0.3
        counts = head_counts(scores, budget, "ada", floor, forced)
        least = max(math.ceil(floor * budget), 5)
        assert int(counts.sum()) == Hkv * budget and int(counts.min()) >= least
        idx = keep_counts(scores, counts, forced, int(counts.max()))
        kept = [set(idx[h, : counts[h]].tolist()) for h in range(Hkv)]
        assert all(len(k) == int(c) for k, c in zip(kept, counts)) and all(set(range(2)) | {47, 48, 49} <= k for k in kept)
        assert all(idx[h, : counts[h]].tolist() == sorted(kept[h]) for h in range(Hkv))
        # beyond each head's guaranteed share, every kept entry beats every evicted entry of every head in the layer
        ranked = scores.sort(-1, descending=True)
        extra = [float(v) for h in range(Hkv) for s, v in zip(ranked.indices[h, least:], ranked.values[h, least:])
                 if int(s) in kept[h] and not forced[s]]
        evicted = [float(scores[h, s]) for h in range(Hkv) for s in range(S) if s not in kept[h]]
        if extra and evicted:
            assert min(extra) >= max(evicted)


def test_alloc_budgets_reach_the_cache_and_batching_matches_single_rows(tiny) -> None:
    from ponder.kv.alloc import layer_budgets

    prompt = PROMPTS[0]
    policy = make_policy("snapkv:budget=12:window=2:kernel=1:alloc=pyramid:beta=3")
    full, comp, _ = _prefill(tiny, prompt, policy)
    held = [int((~comp.holes[layer][0, :, : comp.lengths[0]]).sum(1).unique()) for layer in range(len(comp.k))]
    assert held == layer_budgets(12, len(prompt), len(comp.k), "pyramid", 3, 2 + 4)  # forced: window 2 + 4 sinks and held[0] > held[-1]
    for spec in ALLOC:
        want = [Engine(tiny, kv=make_policy(spec)).generate([p], GREEDY)[0].output_ids for p in PROMPTS]
        got = [c.output_ids for c in Engine(tiny, kv=make_policy(spec)).generate(PROMPTS, GREEDY)]
        assert got == want, spec
        ratio0 = spec.split(":", 1)[0] + ":ratio=0:" + spec.split(":", 2)[2]  # ratio 0 with the same allocation
        assert [c.output_ids for c in Engine(tiny, kv=make_policy(ratio0.replace("budget=12:", ""))).generate(PROMPTS, GREEDY)] \
            == [c.output_ids for c in Engine(tiny).generate(PROMPTS, GREEDY)]
