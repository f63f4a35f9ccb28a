"""The depth seam: how many layers (and which FFN blocks) each decoded token runs.

A ``DepthPolicy`` answers, for one decode step of a batch, three questions the runner (``decode``) asks as it goes
up the layers: how many layers a row runs at most this step (``budgets``: static exits, SkipDecode's schedule),
whether a row stops after a candidate layer (``should_exit``: CALM's confidence exits), and how a layer's FFN block
runs for each row (``run_ffn``: the full block, skipped (FFN skipping), or a small one (Duo-LLM's routes)). Rows
that stop leave the batch; the rows that go on run the remaining layers as a smaller batch. Prompts are always prefilled at full depth; only decode steps are adaptive.

Glossary
- **exit after l**: the row's state after layers ``[0, l)`` goes through the exit head (the final norm and LM head,
  or a trained exit adapter first) and layers ``[l, L)`` are skipped for that token.
- **KV fill** (CALM's state propagation): a skipped layer still needs the token's K/V, since later tokens that run
  that layer attend to it; it is computed from the exit state through that layer's K/V projections (a fraction of
  the layer's cost: its norm and QKV matmul). Policies whose exits only ever get shallower along a row (SkipDecode,
  static exits) never need it: no later token of the row runs a layer this token skipped. The runner checks that
  promise (``DepthRow.floor``) and refuses a policy that breaks it without filling.
- **compute**: attention blocks and FFN blocks run per decoded token (``DepthStats``), against the model's L each
  (small FFN blocks counted apart, weighed by their share of a full block's weights).

The no-op settings (budgets of L, no candidate layer, no FFN skipped) run exactly the plain decode's operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ponder.cache import KVCache
from ponder.model import native
from ponder.model.llama import StepContext
from ponder.model.rope import apply_rope


@dataclass
class DepthRow:
    """A row's depth state across its decode steps."""

    prompt_len: int
    step: int = 0  # decode steps done (the next token's index in the answer)
    floor: int | None = None  # the shallowest exit so far (non-filling policies may never go deeper again)
    exits: list[int] = field(default_factory=list)  # each decoded token's exit layer (L: the full model)
    policy_state: Any = None  # what the policy keeps per row (``DepthPolicy.new_row``)


@dataclass
class DepthStats:
    """Blocks run by decoded tokens (for mean compute per token) and the exits by layer."""

    tokens: int = 0
    attention_blocks: int = 0
    ffn_blocks: int = 0  # full FFN blocks
    small_ffn_blocks: int = 0  # small FFN blocks (Duo-LLM's small modules), each ``small_share`` of a full one
    small_share: float = 0.0
    exits: dict[int, int] = field(default_factory=dict)  # exit layer -> tokens (L: ran every layer)

    def mean_layers(self) -> float:
        return self.attention_blocks / self.tokens if self.tokens else 0.0

    def mean_ffn(self) -> float:
        return self.ffn_blocks / self.tokens if self.tokens else 0.0

    def mean_small(self) -> float:
        return self.small_ffn_blocks / self.tokens if self.tokens else 0.0

    def weight_share(self, n_layers: int, attn_params: int, ffn_params: int) -> float:
        """The share of the layers' weights decoded tokens ran, on average (an FFN block weighs more than an
        attention block: on SmolLM2 3x)."""
        if not self.tokens or not n_layers:
            return 0.0
        run = self.mean_layers() * attn_params + (self.mean_ffn() + self.mean_small() * self.small_share) * ffn_params
        return run / (n_layers * (attn_params + ffn_params))

    def as_dict(self, n_layers: int, attn_params: int = 1, ffn_params: int = 1) -> dict[str, Any]:
        return {"tokens": self.tokens, "mean_attention_blocks": round(self.mean_layers(), 3),
                "mean_ffn_blocks": round(self.mean_ffn(), 3), "layers": n_layers,
                **({"mean_small_ffn_blocks": round(self.mean_small(), 3)} if self.small_share else {}),
                "weight_share": round(self.weight_share(n_layers, attn_params, ffn_params), 4),
                "exits": {str(k): v for k, v in sorted(self.exits.items())}}


class DepthPolicy:
    """Base class: the full model (every method is a no-op). Subclasses override what they decide."""

    name = "full"
    spec = "full"  # the SPEC it was made from
    fills_kv = False  # exits compute the skipped layers' K/V from the exit state (needed when exits can deepen)

    def __init__(self) -> None:
        self.n_layers = 0  # set by ``bind``
        self.attn_params = self.ffn_params = 1  # weights of one attention / FFN block (``bind``)
        self.stats = DepthStats()

    def bind(self, loaded: Any) -> None:
        """Attach to the loaded model (layer count, adapters); raise ``PonderError`` for settings it cannot take."""
        c = loaded.model.config
        self.n_layers = c.num_hidden_layers
        self.attn_params = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + \
            c.num_attention_heads * c.head_dim * c.hidden_size
        self.ffn_params = 3 * c.hidden_size * c.intermediate_size

    def new_row(self, prompt_len: int, max_new: int) -> Any:
        """The policy's own per-row state (``DepthRow.policy_state``)."""
        return None

    def budgets(self, rows: list[DepthRow]) -> list[int]:
        """Per row, the most layers it runs this step (L: no limit)."""
        return [self.n_layers] * len(rows)

    def candidates(self) -> tuple[int, ...]:
        """Layers l (0 < l < L) after which ``should_exit`` is asked."""
        return ()

    def should_exit(self, model: Any, layer: int, h: torch.Tensor, prev: torch.Tensor, rows: list[DepthRow]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For rows still running with states h # [n, 1, E] after ``layer`` layers (``prev``: after ``layer - 1``):
        (exit # [n] bool, the exit logits # [n, V] if computed to decide, else None)."""
        return torch.zeros(h.shape[0], dtype=torch.bool, device=h.device), None

    def ffn_rows(self, layer: int, rows: list[DepthRow]) -> torch.Tensor | None:
        """Which of ``rows`` run layer ``layer``'s FFN block # [n] bool; None: all of them."""
        return None

    def run_ffn(self, layer: int, block: Any, x: torch.Tensor, rows: list[DepthRow]) -> tuple[torch.Tensor, int, int]:
        """Layer ``layer``'s FFN block on the rows' residual states x # [n, 1, E] after attention: (the residual
        state after the block # [n, 1, E], rows that ran the full FFN, rows that ran a small one). This one runs
        the full block on the rows ``ffn_rows`` picks and passes the others' residual stream through unchanged."""
        run = self.ffn_rows(layer, rows)
        if run is None or bool(run.all()):
            return x + block.mlp(block.mlp_norm(x)), len(rows), 0
        pick = run.nonzero().flatten()
        if not len(pick):  # no row runs it: the residual stream passes unchanged
            return x, 0, 0
        out = x.clone()
        xs = x[pick]
        out[pick] = xs + block.mlp(block.mlp_norm(xs))
        return out, len(pick), 0

    def skips_ffn(self, rows: list[DepthRow]) -> bool:
        """Whether ``ffn_rows`` may skip anything for these rows this step (False: the step can run as plain)."""
        return False

    def exit_logits(self, model: Any, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The exit head on the state after ``layer`` layers # [n, 1, E] -> # [n, V]."""
        return model.logits(h)[:, -1]

    def observe(self, rows: list[DepthRow], exits: list[int], ffn_saturation: dict[int, torch.Tensor]) -> None:
        """After a step: each row's exit layer, and for the layers whose FFN ran on every row, the cosine between
        the FFN block's input and output residual states # [n] (FFN skipping decides from them)."""

    def wants_saturation(self, rows: list[DepthRow]) -> bool:
        """Whether this step should measure the FFN blocks' saturation (``observe``'s argument)."""
        return False

    def report(self) -> dict[str, Any]:
        return {"policy": self.name, **self.stats.as_dict(self.n_layers, self.attn_params, self.ffn_params)}


def decode(model: Any, ids: torch.Tensor, cache: KVCache, policy: DepthPolicy, rows: list[DepthRow]) -> torch.Tensor:
    """One decode step under ``policy``: ids # [B, 1] -> logits # [B, V]; advances the cache by one slot per row."""
    B = ids.shape[0]
    L = len(model.layers)
    budgets = policy.budgets(rows)
    candidates = set(policy.candidates())
    measure = policy.wants_saturation(rows)
    if not candidates and not measure and min(budgets) >= L and not policy.skips_ffn(rows):
        _check_floor(policy, rows, L)
        logits = model(ids, cache)[:, -1]  # nothing to decide this step: the plain step (the fast path if loaded)
        _account(policy, rows, [L] * B, L * B, {})
        return logits
    ctx = model.step_context(cache, 1, [1] * B)
    h = model.embed(ids)  # [B, 1, E]
    saturation: dict[int, torch.Tensor] = {}
    exit_at = [L] * B
    logits: list[torch.Tensor | None] = [None] * B
    active = list(range(B))
    ffn_run = small_run = 0
    prev = h  # the state one layer below h (hidden-state saturation compares them)
    for layer in range(L + 1):
        stop = [i for i in active if budgets[i] <= layer or layer == L]
        if layer in candidates and layer < L:
            going = [i for i in active if i not in stop]
            if going:
                sub, before = (h, prev) if len(going) == B else (h[going], prev[going])
                leave, lg = policy.should_exit(model, layer, sub, before, [rows[i] for i in going])
                for j in leave.nonzero().flatten().tolist():
                    stop.append(going[j])
                    if lg is not None:
                        logits[going[j]] = lg[j]
        if stop:
            stop.sort()
            for i in stop:
                exit_at[i] = layer
            need = [i for i in stop if logits[i] is None]
            if need:
                lg = policy.exit_logits(model, layer, h if len(need) == B else h[need])
                for j, i in enumerate(need):
                    logits[i] = lg[j]
            _check_floor(policy, [rows[i] for i in stop], layer)
            if layer < L and policy.fills_kv:
                fill_kv(model, h[stop], cache, ctx, stop, layer)
            active = [i for i in active if i not in stop]
        if not active:
            break
        # run layer `layer` on the rows still going
        block = model.layers[layer]
        full = len(active) == B
        sub_h = h if full else h[active]
        sub_ctx, sub_cache = (ctx, cache) if full else (subset_context(ctx, active), RowsView(cache, active))
        x = sub_h + block.attn(block.attn_norm(sub_h), sub_ctx, sub_cache, layer)
        out, big, small = policy.run_ffn(layer, block, x, [rows[i] for i in active])
        ffn_run += big
        small_run += small
        if measure and full:  # rows whose FFN did not run get cos = 1 (nothing changed), which observe ignores
            saturation[layer] = torch.nn.functional.cosine_similarity(x[:, -1], out[:, -1], dim=-1)
        prev = h
        if full:
            h = out
        else:
            h = h.clone()
            h[active] = out
    cache.advance([1] * B)
    _account(policy, rows, exit_at, ffn_run, saturation, small_run)
    return torch.stack(logits)  # type: ignore[arg-type]


def _account(policy: DepthPolicy, rows: list[DepthRow], exit_at: list[int], ffn_run: int,
             saturation: dict[int, torch.Tensor], small_run: int = 0) -> None:
    """A step's compute into the policy's statistics and each row's state, then the policy's own ``observe``."""
    st = policy.stats
    st.tokens += len(rows)
    st.attention_blocks += sum(exit_at)
    st.ffn_blocks += ffn_run
    st.small_ffn_blocks += small_run
    for e in exit_at:
        st.exits[e] = st.exits.get(e, 0) + 1
    for r, e in zip(rows, exit_at):
        r.step += 1
        r.floor = e if r.floor is None else min(r.floor, e)
        r.exits.append(e)
    policy.observe(rows, exit_at, saturation)


def _check_floor(policy: DepthPolicy, rows: list[DepthRow], layer: int) -> None:
    """A policy that does not fill K/V must never run a layer that an earlier token of the row skipped."""
    if policy.fills_kv:
        return
    for r in rows:
        if r.floor is not None and layer > r.floor:
            raise RuntimeError(f"depth policy {policy.name} ran {layer} layers after an exit at {r.floor} without "
                               "filling K/V: later tokens would read K/V that was never written")


def fill_kv(model: Any, h: torch.Tensor, cache: Any, ctx: StepContext, rows: list[int], layer: int) -> None:
    """CALM's state propagation: write the K/V of layers ``[layer, L)`` for ``rows``' new tokens from their exit
    states h # [n, 1, E] (each skipped layer's input norm, QKV projection and rotation of that state)."""
    sub_ctx = ctx if len(rows) == cache.batch else subset_context(ctx, rows)
    view = cache if len(rows) == cache.batch else RowsView(cache, rows)
    for l in range(layer, len(model.layers)):
        k, v = layer_kv(model.layers[l], h, sub_ctx)
        view.write(l, k.to(view.dtype), v.to(view.dtype), sub_ctx.write_start, sub_ctx.slots, sub_ctx.read_len)


def layer_kv(block: Any, h: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The K, V # [n, T, Hkv, D] a layer computes from its input h # [n, T, E] (rotated keys), as its attention
    does."""
    attn = block.attn
    n, T, _ = h.shape
    qkv = attn.wqkv(block.attn_norm(h)).view(n, T, attn.n_heads + 2 * attn.n_kv, attn.head_dim)
    qk = apply_rope(qkv[:, :, : attn.n_heads + attn.n_kv], ctx.cos, ctx.sin)
    return qk[:, :, attn.n_heads :], qkv[:, :, attn.n_heads + attn.n_kv :]


def subset_context(ctx: StepContext, rows: list[int]) -> StepContext:
    """``ctx`` for a subset of its rows (a decode step's, one token per row)."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or t.shape[0] == 1 else t[rows]

    queries = None if ctx.queries is None else ctx.queries[rows]
    return StepContext(pick(ctx.cos), pick(ctx.sin), ctx.write_start, pick(ctx.slots), ctx.read_len, pick(ctx.mask),
                       ctx.causal, None if ctx.row_read is None else [ctx.row_read[i] for i in rows], None,
                       ctx.prefill, queries, None if ctx.plan is None else native.plan(queries))


class RowsView:
    """Some rows of a ``KVCache``, as attention uses it: writes go to those rows of the cache; reads return their
    readable K/V (copies: the rows need not be contiguous)."""

    def __init__(self, cache: KVCache, rows: list[int]) -> None:
        self.cache = cache
        self.rows = rows
        self.index = torch.tensor(rows, device=cache.k[0].device)
        lo = rows[0]
        self.span = slice(lo, lo + len(rows)) if rows == list(range(lo, lo + len(rows))) else None

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    @property
    def batch(self) -> int:
        return len(self.rows)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, write_start: int | None, slots: torch.Tensor | None,
              read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if write_start is not None:
            s, e = write_start, write_start + k.shape[1]
            if self.span is not None:
                kc[self.span, :, s:e] = k.transpose(1, 2)
                vc[self.span, :, s:e] = v.transpose(1, 2)
            else:
                kc[self.index, :, s:e] = k.transpose(1, 2)
                vc[self.index, :, s:e] = v.transpose(1, 2)
        else:
            rows = self.index[:, None].expand_as(slots)
            kc[rows, :, slots] = k
            vc[rows, :, slots] = v
        if self.span is not None:
            return kc[self.span, :, :read_len], vc[self.span, :, :read_len]
        return kc[self.index, :, :read_len], vc[self.index, :, :read_len]

    def hole_mask(self, layer: int, read_len: int) -> torch.Tensor | None:
        holes = self.cache.hole_mask(layer, read_len)
        return None if holes is None else holes[self.index]
