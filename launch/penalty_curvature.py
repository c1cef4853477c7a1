"""The largest curvature of the EWC, PI and RW penalties that a step checkpoint would start, and
the learning rate above which SGD diverges on it.

    python launch/penalty_curvature.py CHECKPOINT [--reg_importance W] [--momentum 0.9] [--top 5]

The penalty of step t+1 is ``W * sum_n I_n * (w_n - w_old_n)^2`` with ``I`` the importance in
the step-t checkpoint (per-tensor min-max normalised, as training uses it), so its curvature along
weight n is ``2 * W * I_n``. SGD with Nesterov momentum m diverges on a quadratic once the
learning rate times the curvature passes ``1 + 1 / (1 + 2m)`` (1.357 at 0.9). For every
regularizer state in the checkpoint (its own method's or ``--estimate_importance``), this prints
the largest normalised importance, how many tensors reach 0.5 and 0.99, the tensors with the
largest importance, the largest curvature and that learning-rate limit. ``W`` is the method's
preset (EWC and PI 500, RW 100) unless ``--reg_importance`` is given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from segmentation.methods.regularizer import REGULARIZERS, penalty_importance  # noqa: E402
from segmentation.methods.weight_penalty import WeightPenalty, nesterov_stability_limit, saved_states  # noqa: E402


def preset_weight(regularizer: str) -> float:
    """``--reg_importance`` of the method whose regularizer is ``regularizer``."""
    method = next(method for method in WeightPenalty.__subclasses__() if method.regularizer == regularizer)
    return float(method.preset["reg_importance"])


def importance_maxima(state: Mapping[str, Any]) -> List[Tuple[str, float]]:
    """(tensor name, largest normalised importance), largest first."""
    importance = penalty_importance(state, normalize=True)
    maxima = [(name, float(value.max())) for name, value in importance.items() if value.numel()]
    return sorted(maxima, key=lambda item: item[1], reverse=True)


def report(name: str, state: Mapping[str, Any], weight: float, momentum: float, top: int) -> str:
    maxima = importance_maxima(state)
    largest = maxima[0][1]
    curvature = 2 * weight * largest
    limit = nesterov_stability_limit(momentum)
    lines = [
        f"{name}: {len(maxima)} tensors; largest normalised importance {largest:.6g}; "
        f"{sum(value >= 0.5 for _, value in maxima)} tensors reach 0.5, "
        f"{sum(value >= 0.99 for _, value in maxima)} reach 0.99",
        f"  largest curvature 2 x {weight:g} x {largest:.6g} = {curvature:.6g}; SGD with Nesterov momentum "
        f"{momentum:g} diverges above learning rate {limit / curvature:.6g}",
    ]
    lines += [f"    {value:.6g}  {tensor}" for tensor, value in maxima[:top]]
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step checkpoint (step<t>.pth) with regularizer state")
    parser.add_argument("--reg_importance", type=float, default=None,
                        help="penalty weight (default: the method's preset)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--top", type=int, default=5, help="tensors listed per regularizer")
    args = parser.parse_args(argv)
    try:
        checkpoint: Dict[str, Any] = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as error:
        parser.error(f"{args.checkpoint}: cannot read the checkpoint ({error})")
    states = {}
    if isinstance(checkpoint, dict):
        states = {name: state for name, state in saved_states(checkpoint).items()
                  if state.get("name") in REGULARIZERS}
    if not states:
        parser.error(f"{args.checkpoint}: no regularizer state (train with --method EWC/PI/RW or "
                     "--estimate_importance ewc pi rw)")
    for name, state in states.items():
        weight = args.reg_importance if args.reg_importance is not None else preset_weight(name)
        print(report(name, state, weight, args.momentum, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
