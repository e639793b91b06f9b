"""Snakemake script of rule `plot_partitions`: per-partition seconds and throughput."""

from cai.plots import plot_partition_table
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: plot_partition_table(
        snakemake.input[0], snakemake.output.times, snakemake.output.throughput
    ),
)
