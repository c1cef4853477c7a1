"""PI, path integral (Zenke et al.) as in the paper's tables: CE + 500 * score-weighted L2 to step t-1.

Every iteration ``delta += g * (theta_prev - theta_now)``; at the end of the step the score is
``max(0, delta / ((theta_end - theta_old)^2 + 1e-20)) + score_{t-1}``, with ``theta_old`` the step
t-1 weights (the start of the step for a new classifier; ``segmentation.methods.regularizer.PI``).
"""
from segmentation.methods.weight_penalty import WeightPenalty


class PI(WeightPenalty):
    name = "PI"
    paper_row = "PI"
    summary = "CE + 500 x path-integral-score-weighted L2 distance to the step t-1 weights"
    preset = {"regularizer": "pi", "reg_importance": 500.0}
    regularizer = "pi"
