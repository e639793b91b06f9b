# The accuracy gate of lower precisions: the same weights at fp32, bf16 and int8 on the
# run's first labelled galaxies; what each changes against fp32, and how fast it is.


rule precision_gate:
    input:
        PARTITIONS,
        model=model_input(),
    output:
        report(
            "results/precision/{size}MB-b{batch}/precision_gate.tsv",
            caption="captions/precision_gate.rst",
            category="Accuracy",
        ),
    log:
        "results/logs/precision/{size}MB-b{batch}-gate.log",
    threads: config["inference"]["threads"]
    resources:
        # The gate runs on the CPU (int8 has no GPU kernels): no GPU held for it.
        **cluster_resources("infer", gpus=False),
    params:
        gate=config["precision_gate"],
        model=model_settings(),
    script:
        "../scripts/precision_gate.py"
