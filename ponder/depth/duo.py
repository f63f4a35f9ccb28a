"""Duo-LLM routing (arXiv 2410.10846): per token and layer, the big FFN, a small one, or none.

Every layer keeps its attention (so every layer's K/V is written for every token and no fill is needed) and routes
its FFN block per decoded token: a trained router (``ponder distill train duo``, ``ponder/distill/duo.py``) predicts
the error that skipping the block, or running the layer's small distilled FFN instead, would make (by default the
first-order change of the final top-1 margin, as a share of the margin), and the token takes the cheapest option
predicted to stay within ``threshold`` (default: the threshold the modules were calibrated to at training, the
loosest with 95% held-back top-1 agreement). ``threshold=0`` always runs the big FFN: the full model (the no-op
setting). Rows of a batch route independently: the rows that chose the big block run it together, those that chose
the small one run that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ponder.depth.base import DepthPolicy, DepthRow


@dataclass(frozen=True)
class DuoOptions:
    threshold: float = -1.0  # the largest predicted error a cheap option may make (0: always big; -1: the
    # threshold the modules were calibrated to, the loosest with 95% held-back top-1 agreement when trained)
    adapter: str = "default"  # the trained modules: default (the model's own, else the shipped ones) or a directory
    small: bool = True  # False: choose only between big and skip

    def __post_init__(self) -> None:
        if self.threshold < 0 and self.threshold != -1:
            raise ValueError(f"threshold must be >= 0 (or -1: the calibrated one), got {self.threshold}")


class DuoRoute(DepthPolicy):
    name = "duo"

    def __init__(self, options: DuoOptions) -> None:
        super().__init__()
        self.options = options
        self.modules: Any = None
        self.threshold = options.threshold
        self.router_target: str | None = None  # what the loaded routers predict (``bind``)

    def bind(self, loaded: Any) -> None:
        super().bind(loaded)
        from ponder.distill.duo import KIND, load_duo
        from ponder.distill.train import trained_artifact

        path = trained_artifact(loaded, KIND) if self.options.adapter == "default" else self.options.adapter
        self.modules, recipe = load_duo(path, loaded.model)
        self.stats.small_share = recipe["width"] / recipe["intermediate_size"]
        if self.options.threshold == -1:
            self.threshold = float(recipe.get("threshold", 0.0))
        self.router_target = recipe.get("router_target", "local")

    def skips_ffn(self, rows: list[DepthRow]) -> bool:
        return self.threshold > 0

    def run_ffn(self, layer: int, block: Any, x: torch.Tensor, rows: list[DepthRow]) -> tuple[torch.Tensor, int, int]:
        from ponder.distill.duo import choose

        if self.threshold <= 0:
            return super().run_ffn(layer, block, x, rows)
        xn = block.mlp_norm(x)  # [n, 1, E]
        route = choose(self.modules, layer, xn[:, -1], x[:, -1], self.threshold)  # [n]
        if not self.options.small:
            route = torch.where(route == 1, 2, route)
        big = (route == 2).nonzero().flatten().tolist()
        small = (route == 1).nonzero().flatten().tolist()
        n = len(rows)
        if len(big) == n:
            return x + block.mlp(xn), n, 0
        out = x.clone()
        if big:
            out[big] = x[big] + block.mlp(xn[big])
        if small:
            out[small] = x[small] + self.modules.small(layer, xn[small]).to(x.dtype)
        return out, len(big), len(small)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "small_width_share": round(self.stats.small_share, 4),
                "threshold": self.threshold, "router_target": self.router_target}
