"""Snakemake script of rule `plot_training`: the fine-tuning's learning curves."""

from cai.plots import plot_training
from cai.workflow import run_step

run_step(snakemake, lambda: plot_training(snakemake.input[0], snakemake.output[0]))
