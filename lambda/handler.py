"""AWS Lambda entry point of CAI: parse the event, call the package, return its summary.

Everything else (S3 transfers, the model kept warm in the container, inference, the
records) lives in :mod:`cai.lambda_task`. The import time of this module is the
container's init work (Python, torch, the package), reported with cold starts.
"""

import time

_import_started = time.perf_counter()

from cai.lambda_task import configure_logging, handle  # noqa: E402

configure_logging()
INIT_S = time.perf_counter() - _import_started


def handler(event, context):
    """Lambda handler: one invocation's partitions, predicted (see cai.lambda_task)."""
    return handle(event, context, init_s=INIT_S)
