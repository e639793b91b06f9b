"""Snakemake script of rule `import_pt`: the paper's .pt files as one galaxy file."""

from cai.importpt import import_pt
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: import_pt(
        list(snakemake.input), snakemake.output[0], snakemake.params.first_object_id
    ),
)
