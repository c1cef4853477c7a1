"""FT: plain fine-tuning with cross-entropy (the lower bound of the paper's tables)."""
from segmentation.methods.method import Method

METHOD = Method(name="FT", paper_row="FT", summary="cross-entropy only")
