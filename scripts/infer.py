"""Snakemake script of rules `infer` and `infer_local`: one inference job over its
partitions."""

from cai.engine import InferenceSettings, run_inference
from cai.model import ModelConfig
from cai.workflow import check_backend_placement, job_partitions, run_step

model = snakemake.params.model


def infer():
    check_backend_placement(snakemake.params.kind, snakemake.wildcards.backend)
    return run_inference(
        job_partitions(
            snakemake.input[0],
            snakemake.params.partitions,
            snakemake.params.logical,
            snakemake.params.physical,
        ),
        snakemake.output.predictions,
        snakemake.output.metrics,
        InferenceSettings(
            batch_size=int(snakemake.wildcards.batch),
            device=snakemake.params.device,
            threads=snakemake.threads,
            backend=snakemake.wildcards.backend,
            verify_checksum=snakemake.params.verify_checksum,
            precision=snakemake.params.precision,
        ),
        ModelConfig(depth=model["depth"], num_heads=model["num_heads"]),
        model["checkpoint"],
        model["seed"],
    )


run_step(snakemake, infer)
