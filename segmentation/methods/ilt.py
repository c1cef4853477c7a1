"""ILT (Michieli and Zanuttigh): CE + 100 x KD + 100 x L2 distillation of the backbone features."""
from segmentation.methods.method import Method

METHOD = Method(name="ILT", paper_row="ILT", summary="CE + 100 x KD + 100 x MSE of the backbone output",
                preset={"loss_kd": 100.0, "loss_de": 100.0})
