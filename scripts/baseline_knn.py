"""Snakemake script of rule `baseline_knn`: the colours-only yardstick on the split."""

from cai.baseline import knn_baseline
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: knn_baseline(
        [snakemake.input.data], snakemake.input.split, snakemake.output[0]
    ),
)
