"""RW, Riemannian Walk (Chaudhry et al.) as in the paper's tables: CE + 100 * (Fisher + score)-weighted L2.

Fisher EMA as in EWC every iteration; at iterations 0, 10, 20, ... (``--reg_iterations``)
``s += g * (theta_k - theta) / (0.5 * F * (theta - theta_k)^2 + 1e-8)`` with ``theta_k`` the
weights at the previous score update and ``F`` the Fisher before this iteration's update; the
saved score is ``max(s, 0)``, averaged with ``score_{t-1}`` where one exists
(``segmentation.methods.regularizer.RW``).
"""
from segmentation.methods.weight_penalty import WeightPenalty


class RW(WeightPenalty):
    name = "RW"
    paper_row = "RW"
    summary = "CE + 100 x (Fisher + Riemannian-walk score)-weighted L2 distance to the step t-1 weights"
    preset = {"regularizer": "rw", "reg_importance": 100.0}
    regularizer = "rw"
    importance_bound = 2.0  # normalised Fisher plus normalised score
