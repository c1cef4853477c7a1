"""RW, Riemannian Walk (Chaudhry et al.) as in the paper's tables: CE + 100 * (Fisher + score)-weighted L2.

Fisher EMA as in EWC every iteration; every ``--reg_iterations`` (10) iterations
``s += g * (theta_k - theta) / (0.5 * F * (theta - theta_k)^2 + 1e-8)`` with ``theta_k`` the
weights at the previous score update; the saved score is ``0.5 * (max(s, 0) + score_{t-1})``
(spec §5.5).
"""
from segmentation.methods.method import Method

METHOD = Method(
    name="RW",
    paper_row="RW",
    summary="CE + 100 x (Fisher + Riemannian-walk score)-weighted L2 distance to the step t-1 weights",
    preset={"regularizer": "rw", "reg_importance": 100.0},
    regularizer="rw",
)
