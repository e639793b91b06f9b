# The AWS backend (inference.backend: lambda, set by profiles/aws): stage the partitions
# and the model to S3, then fan the plan's jobs out as Lambda invocations and fetch the
# checked results for the aggregate step. Both rules run on this machine and talk to
# AWS (or the local stack) through boto3.

LAMBDA = "results/lambda"


localrules:
    stage,
    deploy,
    dispatch,


rule stage:
    input:
        PARTITIONS,
        model=model_input(),
    output:
        LAMBDA + "/staged/{size}MB.json",
    log:
        "results/logs/lambda/stage-{size}MB.log",
    params:
        aws=config["aws"],
        model=model_settings(),
    script:
        "../scripts/stage.py"


rule deploy:
    output:
        LAMBDA + "/deploy/" + config["aws"]["function_name"] + ".json",
    log:
        "results/logs/lambda/deploy.log",
    params:
        aws=config["aws"],
    script:
        "../scripts/deploy.py"


rule dispatch:
    input:
        receipt=LAMBDA + "/staged/{size}MB.json",
        deployed=deploy_receipt(),
        after=after_previous_run,
    output:
        results=directory(RUN + "/lambda/results"),
        records=report(
            RUN + "/lambda/invocations.tsv",
            caption="captions/invocations.rst",
            category="Timing",
        ),
        summary=RUN + "/lambda/dispatch.json",
    log:
        LOGS + "/dispatch.log",
    wildcard_constraints:
        backend="|".join(
            b for b, e in config["backends"].items() if e["kind"] == "lambda"
        )
        or "(?!)",
    params:
        jobs=get_plan_jobs,
        logical=lambda wildcards: plan_of(wildcards).logical,
        model=model_settings(),
        failed_records=LOGS + "/dispatch-failed-invocations.tsv",
        precision=config["inference"]["precision"],
    script:
        "../scripts/dispatch.py"
