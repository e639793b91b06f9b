# Fine-tuning (config `finetune`), part of the DAG when finetuning(): the labelled
# galaxies split 70/10/20 into train, validation and test; AstroMAE's head trained on
# the train split with the encoder frozen, stopped early on the validation split; the
# colours-only kNN yardstick fitted on the same split. Every rule that predicts then
# loads the fine-tuned checkpoint, and accuracy counts the test split only.


localrules:
    split,
    plot_training,


rule split:
    input:
        DATASET,
    output:
        FINETUNE + "/split.parquet",
    log:
        "results/logs/finetune/split.log",
    params:
        seed=config["finetune"]["seed"],
        fractions=config["finetune"]["split"],
        min_validation=config["finetune"]["min_validation"],
    script:
        "../scripts/split.py"


rule finetune:
    input:
        data=DATASET,
        split=FINETUNE + "/split.parquet",
        encoder=config["model"]["checkpoint"] or [],
    output:
        checkpoint=FINETUNED,
        record=FINETUNE + "/training.json",
    log:
        "results/logs/finetune/finetune.log",
    threads: config["finetune"]["threads"]
    resources:
        **cluster_resources("finetune"),
    params:
        finetune=finetune_params(),
        model=config["model"],
        # Copied inputs, the encoder cache and each epoch's state: kept when the job
        # fails or is killed, so a rerun resumes after the last finished epoch.
        work=FINETUNE + "/work",
    script:
        "../scripts/finetune.py"


rule baseline_knn:
    input:
        data=DATASET,
        split=FINETUNE + "/split.parquet",
    output:
        FINETUNE + "/baseline_knn.parquet",
    log:
        "results/logs/finetune/baseline_knn.log",
    resources:
        **cluster_resources("aggregate"),
    script:
        "../scripts/baseline_knn.py"


rule plot_training:
    input:
        FINETUNE + "/training.json",
    output:
        report(
            FINETUNE + "/training.png",
            caption="captions/training.rst",
            category="Accuracy",
        ),
    log:
        "results/logs/finetune/plot_training.log",
    script:
        "../scripts/plot_training.py"
