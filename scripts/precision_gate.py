"""Snakemake script of rule `precision_gate`: each precision against fp32."""

from cai.model import ModelConfig
from cai.precision import GateLimits, run_gate
from cai.workflow import run_step

gate = snakemake.params.gate
model = snakemake.params.model
run_step(
    snakemake,
    lambda: run_gate(
        snakemake.input[0],
        gate["precisions"],
        gate["max_galaxies"],
        int(snakemake.wildcards.batch),
        snakemake.threads,
        GateLimits(gate["max_nmad_change"], gate["max_abs_dz"]),
        snakemake.output[0],
        ModelConfig(depth=model["depth"], num_heads=model["num_heads"]),
        model["checkpoint"],
        model["seed"],
    ),
)
