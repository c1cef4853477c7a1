"""LwF-MC (iCaRL's loss without exemplars): multi-label BCE at every step, + 10 x BCE distillation."""
from segmentation.methods.method import Method

METHOD = Method(name="LWF-MC", paper_row="LwF-MC",
                summary="BCE (also at step 0) + 10 x C_old x BCE distillation towards the old sigmoids",
                preset={"icarl": True, "icarl_importance": 10.0})
