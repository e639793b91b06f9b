"""Snakemake script of rule `accuracy`: the accuracy table of the catalogue (with
fine-tuning: of its test split, beside the kNN baseline)."""

from cai.aggregate import predictions_label, read_summary
from cai.metrics import write_accuracy_table
from cai.workflow import run_step

inputs = snakemake.input
run_step(
    snakemake,
    lambda: write_accuracy_table(
        inputs.catalogue,
        snakemake.output[0],
        predictions_label(read_summary(inputs.summary)),
        inputs.get("split"),
        inputs.get("baseline"),
    ),
)
