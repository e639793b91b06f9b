"""Snakemake script of rule `accuracy`: the accuracy table of the catalogue."""

from cai.aggregate import predictions_label, read_summary
from cai.metrics import write_accuracy_table
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: write_accuracy_table(
        snakemake.input.catalogue,
        snakemake.output[0],
        predictions_label(read_summary(snakemake.input.summary)),
    ),
)
