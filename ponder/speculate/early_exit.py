"""Self-speculative decoding with early exit (LayerSkip arXiv 2404.16710, Kangaroo 2404.18911, DEL 2504.05598).

The target drafts for itself: its first ``layer`` layers and its own head (``model.logits`` on the layer's hidden
state) decode greedily, writing those layers' K/V into the target's cache. The verify forward then starts at
``layer`` from the hidden states the drafting already computed (LayerSkip's cache reuse), so the first layers run
once per token. Drafting stops early when the exit head's top-1 probability falls below ``threshold`` (Kangaroo's
second early exit), or at ``k`` tokens.

``layer=auto`` follows DEL: every ``probe`` verify steps the verify forward reports the hidden states entering each
candidate exit layer (one candidate in turn while drafting is paused); the shared head on them tells how often each
layer's prediction matches the token the target committed. With those acceptance rates (running averages) and the
measured costs (a layer, the head, the verify curve), the drafter picks the exit layer and draft length with the
most expected tokens per second. Whether drafting
pays at all is measured, not modelled, by the draft policy's gate (``policy.DraftGate``: whole steps timed with and
without drafting, the faster kept, the other retried every ``explore`` steps); a step it leaves undrafted gives
every row a budget of 0. (The drafter once kept a gate of its own too; each gate then timed the other's plain
steps as its drafting ones, and early exit drafted on 29% of the steps at 0.95x plain decoding's speed.)

The default model (SmolLM2) was not trained for early exit (LayerSkip trains with layer dropout and an early-exit
loss), so its early layers draft poorly; the bench reports the acceptance per layer. ``adapter=PATH`` (or
``adapter=default``: the loaded model's default artifact, ``ponder distill train exits``) reads each exit layer's
state through its trained exit adapter (tuned lens 2303.08112, Kangaroo 2404.18911; ``ponder.distill.exits``)
before the head, when drafting and when probing; ``layer=auto`` then chooses among the adapters' layers only, and
a fixed ``layer`` must have one. Only the drafts change: the verify forward continues from the unadapted states,
so the output stays plain decoding's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ponder.speculate.base import DraftBatch, Drafter, Proposal, RowResult
from ponder.speculate.tree import DraftTree


@dataclass(frozen=True)
class EarlyExitOptions:
    layer: str = "auto"  # exit layer, or "auto" (DEL)
    k: int = 6  # most draft tokens per step
    threshold: float = 0.4  # stop drafting when the exit head's top-1 probability is lower
    probe: int = 8  # auto: measure every candidate layer's acceptance every `probe` verify steps
    adapter: str = ""  # exit adapters' artifact directory, "default" for the model's own, "" for none

    def __post_init__(self) -> None:
        if self.layer != "auto" and not self.layer.isdigit():
            raise ValueError(f"early-exit layer must be a layer number or auto, got {self.layer!r}")
        if self.k < 1 or not 0 <= self.threshold < 1 or self.probe < 1:
            raise ValueError("early-exit needs k >= 1, threshold in [0, 1) and probe >= 1")


@dataclass
class LayerStats:
    """Running acceptance rate of each candidate exit layer's greedy prediction (DEL's per-layer tracking).

    An exponential moving average with weight ``1 - decay`` per observation. The observations of one verify step
    (every row, every committed position) arrive together and none is more recent than another, so ``update`` gives
    them equal weight: the batch's mean ``hits / total`` replaces the old estimate with weight ``1 - decay**total``,
    exactly the weight ``total`` single updates would give. Feeding them one by one in an arbitrary order (all hits,
    then all misses) would weigh the last ones most and bias the estimate toward them.
    """

    rate: dict[int, float] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)

    def update(self, layer: int, hits: int, total: int, decay: float = 0.95) -> None:
        if not 0 <= hits <= total:
            raise ValueError(f"LayerStats.update needs 0 <= hits <= total, got hits={hits}, total={total}")
        if total == 0:
            return
        keep = decay**total  # the old estimate's share after `total` observations
        self.rate[layer] = keep * self.rate.get(layer, 0.5) + (1 - keep) * hits / total
        self.seen[layer] = self.seen.get(layer, 0) + total


class EarlyExit(Drafter):
    name = "early-exit"

    def __init__(self, options: EarlyExitOptions, n_layers: int, head_layers: float, adapters: Any = None) -> None:
        self.options = options
        self.n_layers = n_layers
        self.head_layers = head_layers  # the head's cost in layers (SmolLM2: a 49k x 576 head ~ 8 layers)
        self.adapters = adapters  # ponder.distill.exits.ExitAdapters, or None: the plain exit
        if options.layer == "auto":
            step = max(1, n_layers // 5)  # ~4 candidates: each costs a head evaluation per probe
            self.candidates = list(adapters.layers) if adapters else list(range(step, n_layers - step + 1, step))
            self.layer = self.candidates[len(self.candidates) // 3]
        else:
            self.layer = int(options.layer)
            if not 1 <= self.layer < n_layers:
                raise ValueError(f"early-exit layer must be in [1, {n_layers - 1}], got {self.layer}")
            if adapters and self.layer not in adapters.layers:
                raise ValueError(f"the exit adapters have no layer {self.layer} (they have "
                                 f"{', '.join(map(str, adapters.layers))}): use one of those or layer=auto")
            self.candidates = [self.layer]
        self.stats = LayerStats()
        self.steps = 0
        self.k = options.k
        self.drafting_steps = 0
        self.paused_probes = 0  # probes while not drafting (each probes one candidate layer)

    @classmethod
    def build(cls, options: EarlyExitOptions, target: Any) -> "EarlyExit":
        from ponder.errors import PonderError

        cfg = target.model.config
        layer_params = 4 * cfg.hidden_size * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
        head = cfg.vocab_size * cfg.hidden_size
        adapters = _load_adapters(options.adapter, target) if options.adapter else None
        if adapters is not None:
            # the adapter runs before the head on every exit (its dearest layer's: an MLP's is 1.8 E x E more)
            head += max(adapters.extra_macs(layer) for layer in adapters.layers)
        try:
            return cls(options, cfg.num_hidden_layers, head / layer_params, adapters)
        except ValueError as e:
            raise PonderError(str(e))

    def _exit_logits(self, model: Any, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The exit head on the state entering ``layer`` # [..., E] -> # [..., V], through its adapter if any."""
        if self.adapters is not None:
            h = self.adapters(layer, h)
        return model.logits(h)

    def propose(self, batch: DraftBatch) -> Proposal:
        model, cache, rows = batch.model, batch.cache, batch.rows
        L, B = self.layer, len(rows)
        start_lengths = list(cache.lengths)
        feed = torch.tensor([[r.tokens[-1]] for r in rows], device=model.device)
        hidden: list[list[torch.Tensor]] = [[] for _ in rows]
        drafts: list[list[int]] = [[] for _ in rows]
        scores: list[list[float]] = [[] for _ in rows]
        active = [min(self.k, r.budget) > 0 for r in rows]
        self.drafting_steps += any(active)
        probing = len(self.candidates) > 1 and (self.steps + 1) % self.options.probe == 0
        if not any(active):  # paused (the gate's plain steps) or no budget: plain decoding, still probing when due,
            # one candidate per probe in turn: each costs an exit head (SmolLM2's ~ 8 layers), and probing all five
            # every 8 steps made a paused drafter 9% slower than plain decoding (1.5% now)
            self.steps += 1
            empty = [DraftTree() for _ in rows]
            if not probing:
                return Proposal(empty)
            self.paused_probes += 1
            return Proposal(empty, capture=(self.candidates[self.paused_probes % len(self.candidates)],))
        for step in range(self.k + 1):
            ctx = model.step_context(cache, 1, [1] * B)
            h = model.run_layers(model.embed(feed), ctx, cache, 0, L)  # [B, 1, E]
            cache.advance([1] * B)
            for b in range(B):
                if len(hidden[b]) <= len(drafts[b]):
                    hidden[b].append(h[b, 0])
            if not any(active):
                break
            probs = torch.softmax(self._exit_logits(model, L, h[:, 0]).float(), -1)
            conf, tok = probs.max(-1)
            for b, r in enumerate(rows):
                if active[b] and (len(drafts[b]) >= min(self.k, r.budget) or float(conf[b]) < self.options.threshold):
                    active[b] = False
                if active[b]:
                    drafts[b].append(int(tok[b]))
                    scores[b].append(float(conf[b]))
            if not any(active) and all(len(hidden[b]) > len(drafts[b]) for b in range(B)):
                break
            feed = tok.view(B, 1)
        for b, n in enumerate(start_lengths):
            cache.truncate(b, n)
        trees = [DraftTree.chain(d, s, self.name) for d, s in zip(drafts, scores)]
        self.steps += 1
        if len(self.candidates) > 1 and self.steps % self.options.probe == 0:
            # probe: verify from layer 0 so every candidate layer's input is computed and reported
            return Proposal(trees, capture=tuple(self.candidates))
        return Proposal(trees, L, [torch.stack(h) for h in hidden])

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        model = batch.model
        counts: dict[int, list[int]] = {}  # layer -> [hits, total] over every row: one step, one update
        for res in results:
            if not res.hidden:
                continue
            inputs = [0] + [i + 1 for i in res.path]  # verify inputs whose next token was committed
            want = torch.tensor(res.committed, device=res.logits.device)
            for layer, h in res.hidden.items():
                guess = self._exit_logits(model, layer, h[inputs]).argmax(-1)
                c = counts.setdefault(layer, [0, 0])
                c[0] += int((guess == want).sum())
                c[1] += len(inputs)
        for layer, (hits, total) in counts.items():
            self.stats.update(layer, hits, total)
        if self.stats.rate:
            self._choose()

    def report(self) -> dict[str, Any]:
        """Per candidate exit layer: how often its prediction matched the committed token (running average), and
        the layer, draft length and drafting share the drafter ended with."""
        return {
            "layer_acceptance": {str(k): round(v, 3) for k, v in sorted(self.stats.rate.items())},
            "layer_probes": {str(k): v for k, v in sorted(self.stats.seen.items())},
            "exit_layer": self.layer, "draft_length": self.k,
            "drafting_steps": self.drafting_steps, "steps": self.steps,
        }

    def _choose(self) -> None:
        """DEL: the exit layer and draft length with the most expected tokens per unit of compute."""
        N, head = self.n_layers, self.head_layers
        best = (0.0, self.layer, self.k)
        for layer, a in self.stats.rate.items():
            a = min(a, 0.99)
            for k in range(1, self.options.k + 1):
                tau = (1 - a ** (k + 1)) / (1 - a)
                cost = k * (layer + head) + (N - layer + head) + 0.15 * k * (N + head)  # drafts, verify, verify width
                if tau / cost > best[0]:
                    best = (tau / cost, layer, k)
        _, self.layer, self.k = best


def _load_adapters(adapter: str, target: Any) -> Any:
    """The exit adapters ``adapter`` names ("default": the loaded model's default artifact directory), in the
    target's dtype where it computes in floats (int8's residual stream is fp32)."""
    from pathlib import Path

    from ponder.distill.exits import KIND, load_exits
    from ponder.distill.train import trained_artifact

    path = trained_artifact(target, KIND) if adapter == "default" else Path(adapter).expanduser()
    adapters, _ = load_exits(path, target.model)
    dtype = target.model.dtype
    return adapters.to(dtype if dtype in (torch.float32, torch.float16) else torch.float32)
