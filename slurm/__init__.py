"""Slurm job scripts and the submit tool (``python slurm/submit.py --help``)."""
