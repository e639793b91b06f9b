"""Snakemake script of rule `finetune`: AstroMAE's head trained, the encoder frozen."""

from cai.finetune import FinetuneSettings, finetune
from cai.model import ModelConfig
from cai.workflow import run_step

settings = dict(snakemake.params.finetune)
model = snakemake.params.model
run_step(
    snakemake,
    lambda: finetune(
        [snakemake.input.data],
        snakemake.input.split,
        snakemake.output.checkpoint,
        snakemake.output.record,
        FinetuneSettings(
            seed=settings["seed"],
            max_epochs=settings["max_epochs"],
            patience=settings["patience"],
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            weight_decay=settings["weight_decay"],
            warmup_epochs=settings["warmup_epochs"],
            final_lr_fraction=settings["final_lr_fraction"],
            augment=settings["augment"],
            average_decay=settings["average_decay"],
            recentre=settings["recentre"],
            min_validation=settings["min_validation"],
            threads=snakemake.threads,
            device=settings["device"],
        ),
        ModelConfig(depth=model["depth"], num_heads=model["num_heads"]),
        model["checkpoint"],
        model["seed"],
        snakemake.params.work,
    ),
)
