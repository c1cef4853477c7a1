"""FT: plain fine-tuning with cross-entropy (the lower bound of the paper's tables).

FT adds nothing to a step: the classification loss is cross-entropy unless an active method
replaces it (``segmentation.methods.step_methods``).
"""
from segmentation.methods.method import Method


class FT(Method):
    name = "FT"
    paper_row = "FT"
    summary = "cross-entropy only"
