rule plot_redshift:
    input:
        catalogue=RUN + "/catalogue.parquet",
        summary=RUN + "/summary.json",
        split=evaluation_inputs().get("split", []),
    output:
        report(
            RUN + "/plots/redshift_density.png",
            caption="captions/redshift_density.rst",
            category="Accuracy",
        ),
    log:
        LOGS + "/plot_redshift.log",
    script:
        "../scripts/plot_redshift.py"


rule plot_partitions:
    input:
        RUN + "/partition_metrics.tsv",
    output:
        times=report(
            RUN + "/plots/partition_times.png",
            caption="captions/partition_times.rst",
            category="Timing",
        ),
        throughput=report(
            RUN + "/plots/partition_throughput.png",
            caption="captions/partition_throughput.rst",
            category="Timing",
        ),
    log:
        LOGS + "/plot_partitions.log",
    script:
        "../scripts/plot_partitions.py"
