"""The real CAI handler, made to crash on one partition, for the fault tests.

Runs under the Lambda Runtime Interface Emulator like lambda/handler.py; the partition
id to crash on comes from the function's environment (CAI_TEST_CRASH_PARTITION).
"""

import os

from cai.lambda_task import handle


def handler(event, context):
    """Raise for the chosen partition; predict every other one as CAI does."""
    doomed = os.environ["CAI_TEST_CRASH_PARTITION"]
    if any(part["id"] == doomed for part in event["partitions"]):
        raise RuntimeError(f"injected crash on {doomed}")
    return handle(event, context)
