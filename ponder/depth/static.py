"""Static layer dropping: every decoded token runs the first ``layers`` layers and exits through the final norm and
head, the baseline every adaptive policy has to beat at each compute budget (the layer-dropping baselines of CALM,
arXiv 2207.07061, and SkipDecode, arXiv 2307.02628). No K/V fill is needed: no decoded token ever runs the dropped
layers. ``layers=0`` (the default) or the model's depth is the full model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ponder.depth.base import DepthPolicy, DepthRow
from ponder.errors import PonderError


@dataclass(frozen=True)
class StaticOptions:
    layers: int = 0  # layers every decoded token runs (0: all of them)

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")


class StaticExit(DepthPolicy):
    name = "static"

    def __init__(self, options: StaticOptions) -> None:
        super().__init__()
        self.options = options

    def bind(self, loaded: Any) -> None:
        super().bind(loaded)
        if self.options.layers > self.n_layers:
            raise PonderError(f"static:layers={self.options.layers}: this model has {self.n_layers} layers")

    def budgets(self, rows: list[DepthRow]) -> list[int]:
        return [self.options.layers or self.n_layers] * len(rows)
