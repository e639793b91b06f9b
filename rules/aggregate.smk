rule aggregate:
    input:
        partitions=PARTITIONS,
        predictions=get_job_outputs("predictions"),
        metrics=get_job_outputs("metrics"),
    output:
        catalogue=RUN + "/catalogue.parquet",
        partition_metrics=report(
            RUN + "/partition_metrics.tsv",
            caption="captions/partition_metrics.rst",
            category="Timing",
        ),
        summary=RUN + "/summary.json",
    log:
        LOGS + "/aggregate.log",
    resources:
        **cluster_resources("aggregate"),
    params:
        logical=lambda wildcards: plan_of(wildcards).logical,
    script:
        "../scripts/aggregate.py"


rule accuracy:
    input:
        **evaluation_inputs(),
        catalogue=RUN + "/catalogue.parquet",
        summary=RUN + "/summary.json",
    output:
        report(
            RUN + "/accuracy.tsv",
            caption="captions/accuracy.rst",
            category="Accuracy",
        ),
    log:
        LOGS + "/accuracy.log",
    script:
        "../scripts/accuracy.py"
