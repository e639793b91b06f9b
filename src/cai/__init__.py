"""CAI: Cloud-based Astronomy Inference.

AstroMAE redshift inference over SDSS-like 5-band galaxy images, locally, on SLURM or
on AWS Lambda, driven by one Snakemake workflow.
"""

__version__ = "0.1.0"
