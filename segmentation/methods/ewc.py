"""EWC (Kirkpatrick et al.) as in the paper's tables: CE + 500 * Fisher-weighted L2 to step t-1.

The Fisher is an exponential moving average of squared gradients (alpha = ``--reg_alpha``, 0.9),
updated every iteration and continued from step to step (``segmentation.methods.regularizer.EWC``).
"""
from segmentation.methods.weight_penalty import WeightPenalty


class EWC(WeightPenalty):
    name = "EWC"
    paper_row = "EWC"
    summary = ("CE + 500 x Fisher-weighted L2 distance to the step t-1 weights (Fisher: EMA of squared "
               "gradients, alpha 0.9)")
    preset = {"regularizer": "ewc", "reg_importance": 500.0}
    regularizer = "ewc"
