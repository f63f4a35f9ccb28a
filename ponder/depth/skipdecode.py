"""SkipDecode (arXiv 2307.02628): an exit point per sequence position, shared by the batch and non-increasing along
the sequence, so a later token never needs K/V that an earlier token skipped (no recomputation, no fill).

The schedule decays linearly from ``start`` layers at the first decoded token to ``end`` layers at token ``span``
and stays there. The paper skips lower layers of a model fine-tuned for it; ponder runs models as released, whose
lower layers cannot be skipped (their output is what every upper layer reads), so here the skipped layers are the
top ones and the exit reads the state through the final norm and head. Rows keep their own position: rows admitted
together share every exit point (the paper's batch-uniform exit), and a row joining a running batch follows its own
schedule, which keeps each row's exits monotone. ``start=end=L`` (``end=0`` means L) is the full model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ponder.depth.base import DepthPolicy, DepthRow
from ponder.errors import PonderError


@dataclass(frozen=True)
class SkipDecodeOptions:
    start: int = 0  # layers at the first decoded token (0: all of them)
    end: int = 0  # layers from token `span` on (0: all of them)
    span: int = 128  # decoded tokens over which the exit point decays linearly

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < 0 or self.span < 1:
            raise ValueError("start and end must be >= 0 and span >= 1")


class SkipDecode(DepthPolicy):
    name = "skipdecode"

    def __init__(self, options: SkipDecodeOptions) -> None:
        super().__init__()
        self.options = options
        self.start = self.end = 0

    def bind(self, loaded: Any) -> None:
        super().bind(loaded)
        o, L = self.options, self.n_layers
        self.start, self.end = o.start or L, o.end or L
        if not 1 <= self.end <= self.start <= L:
            raise PonderError(f"skipdecode needs 1 <= end <= start <= {L} layers (non-increasing exits), got "
                              f"start={self.start}, end={self.end}")

    def layers_at(self, step: int) -> int:
        """Layers the decoded token ``step`` (0 = the first one fed back) runs: non-increasing in ``step``."""
        span = self.options.span
        frac = min(step, span) / span
        return round(self.start - (self.start - self.end) * frac)

    def budgets(self, rows: list[DepthRow]) -> list[int]:
        return [self.layers_at(r.step) for r in rows]
