"""CAI: AstroMAE redshift inference over partitioned galaxy images, as one DAG.

dataset -> partitions -> inference per partition group -> catalogue -> accuracy,
timing tables -> plots -> report. `snakemake --cores all` runs it locally on the
defaults of config/config.yaml; profiles/ hold the cluster and cloud settings.
"""

import os

import yaml
from snakemake.utils import min_version, validate

from cai.metrics import accuracy_summary
from cai.workflow import coerce_cli_values

min_version("9.0")


# The documented defaults, wherever snakemake runs from; --configfile and --config
# override keys of it.
configfile: os.path.join(workflow.basedir, "config/config.yaml")


# Nested --config values arrive as strings; give them the types the schema expects.
coerce_cli_values(
    config, yaml.safe_load(open(f"{workflow.basedir}/config/schema.yaml"))
)


validate(config, "config/schema.yaml")


report: "rules/captions/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/partition.smk"
include: "rules/finetune.smk"
include: "rules/inference.smk"
include: "rules/lambda.smk"
include: "rules/precision.smk"
include: "rules/aggregate.smk"
include: "rules/plots.smk"
include: "rules/experiment.smk"


rule all:
    default_target: True
    input:
        final_targets(),


# The configured run's accuracy on the terminal, once it has been measured.
onsuccess:
    if os.path.exists(f"{run_dir()}/accuracy.tsv"):
        print(accuracy_summary(f"{run_dir()}/accuracy.tsv"))
