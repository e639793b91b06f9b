"""Snakemake script of rule `experiment_figures`: the comparison figures."""

from pathlib import Path

from cai.experiment import read_runs
from cai.figures import experiment_figures
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: experiment_figures(
        read_runs(snakemake.input[0]), Path(snakemake.output.index).parent
    ),
)
