"""Confident early exits with K/V fill (CALM, arXiv 2207.07061).

After each candidate layer l a decoded token may stop: when its confidence passes ``threshold`` its state after l
layers gives the token (through the exit head: the final norm and LM head, after a trained exit adapter with
``adapter=default|PATH``, see ``ponder distill train exits``), and the skipped layers' K/V for that token are
computed from that state (CALM's state propagation, ``base.fill_kv``), so later tokens, which may run deeper,
attend to every layer. Confidence measures (``measure``):

- ``softmax``: the exit distribution's top probability (CALM's softmax response);
- ``margin``: its top-1 minus top-2 probability;
- ``state``: the cosine between the states after l and l - 1 layers (CALM's hidden-state saturation); free, where
  the other two pay a full LM head per candidate layer, which on a small model costs several layers' weights.

``threshold`` above 1 never exits: the full model (the no-op setting). CALM calibrates the threshold to a target
agreement with the full model; ``ponder analyze depth`` measures agreement against compute for a sweep of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ponder.depth.base import DepthPolicy, DepthRow
from ponder.errors import PonderError

MEASURES = ("softmax", "margin", "state")


@dataclass(frozen=True)
class ExitOptions:
    threshold: float = 0.9  # confidence at which a token exits (> 1: never)
    layers: str = ""  # candidate exit layers, "/"- or comma-separated (default: the adapter's >= L/2, or 16/20/24 of 30)
    measure: str = "softmax"  # softmax | margin | state
    adapter: str = ""  # exit adapters: "" (none: the plain logit lens), default, or a directory

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")


class ConfidentExit(DepthPolicy):
    name = "exit"
    fills_kv = True

    def __init__(self, options: ExitOptions) -> None:
        super().__init__()
        self.options = options
        self.layers: tuple[int, ...] = ()
        self.adapters: Any = None

    def bind(self, loaded: Any) -> None:
        super().bind(loaded)
        L, o = self.n_layers, self.options
        if o.adapter:
            from ponder.speculate.early_exit import _load_adapters

            self.adapters = _load_adapters(o.adapter, loaded)
        if o.layers:
            try:
                layers = tuple(sorted({int(x) for x in o.layers.replace("/", ",").split(",") if x.strip()}))
            except ValueError:
                raise PonderError(f"exit:layers={o.layers!r}: write layer numbers separated by / (16/20/24)") from None
        elif self.adapters is not None:
            layers = tuple(x for x in self.adapters.layers if x >= L // 2)
        else:
            layers = tuple(sorted({round(f * L) for f in (16 / 30, 20 / 30, 24 / 30)}))
        if not layers or not all(0 < x < L for x in layers):
            raise PonderError(f"exit candidate layers must lie in 1..{L - 1}, got {layers}")
        if self.adapters is not None and (missing := [x for x in layers if x not in self.adapters.layers]):
            raise PonderError(f"the exit adapters have no map for layers {missing} (they cover "
                              f"{list(self.adapters.layers)}); choose layers= among those")
        self.layers = layers

    def candidates(self) -> tuple[int, ...]:
        return self.layers if self.options.threshold <= 1 else ()

    def exit_logits(self, model: Any, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.adapters is not None and layer in self.adapters.layers:
            h = self.adapters(layer, h)
        return model.logits(h)[:, -1]

    def should_exit(self, model: Any, layer: int, h: torch.Tensor, prev: torch.Tensor, rows: list[DepthRow]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.options.threshold
        if self.options.measure == "state":
            return torch.nn.functional.cosine_similarity(h[:, -1], prev[:, -1], dim=-1) >= t, None
        logits = self.exit_logits(model, layer, h)
        probs = torch.softmax(logits.float(), dim=-1)
        if self.options.measure == "softmax":
            return probs.max(dim=-1).values >= t, logits
        top2 = probs.topk(2, dim=-1).values
        return (top2[:, 0] - top2[:, 1]) >= t, logits
