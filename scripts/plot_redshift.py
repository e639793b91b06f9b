"""Snakemake script of rule `plot_redshift`: z_pred against z_true as a density (with
fine-tuning: of the test split)."""

from cai.plots import plot_catalogue
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: plot_catalogue(
        snakemake.input.catalogue,
        snakemake.input.summary,
        snakemake.output[0],
        snakemake.input.get("split") or None,
    ),
)
