"""The original MiB and PLOP entry point: ``run.py`` is ``train.py``, so their command lines run
verbatim, e.g.

    torchrun --nproc_per_node 2 run.py --data_root data --batch_size 12 --dataset voc --name MIB \
        --task 15-5 --step 0 --lr 0.01 --epochs 30 --method MIB
    python -m torch.distributed.launch --nproc_per_node=2 run.py ...     (the original README's launcher)
"""
import sys

from train import cli

if __name__ == "__main__":
    sys.exit(cli())
