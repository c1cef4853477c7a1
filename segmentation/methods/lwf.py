"""LwF (Li and Hoiem): CE + 100 x knowledge distillation on the old channels."""
from segmentation.methods.method import Method

METHOD = Method(name="LWF", paper_row="LwF", summary="CE + 100 x KD on the old channels",
                preset={"loss_kd": 100.0})
