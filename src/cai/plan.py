"""The plan of a run: how many partitions it predicts and which job predicts which.

A run may cover more data than is stored: the paper goes to 1 TB. Such a run is
planned as ``logical`` partitions that read the ``physical`` partition files cyclically
(logical partition i reads physical partition i mod physical): every galaxy of every
logical partition is still read and predicted; only storage is shared. A run smaller
than the stored data predicts the first partitions only.

Jobs group consecutive partitions. Their number is capped (``max_jobs``) so that even
the paper's 1 TB plan stays within what a scheduler accepts and Snakemake plans in
seconds: past the cap, each job takes more partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """Partitions and jobs of one run.

    Attributes:
        physical: Partition files on disk.
        logical: Partitions predicted (equal to ``physical`` unless a data size is set).
        per_job: Partitions per inference job.
    """

    physical: int
    logical: int
    per_job: int

    @property
    def jobs(self) -> int:
        return math.ceil(self.logical / self.per_job)

    @property
    def storage_shared(self) -> bool:
        """Whether some physical partition is read by more than one logical one."""
        return self.logical > self.physical

    def job_partitions(self, job: int) -> range:
        """Logical partition indices predicted by inference job ``job``."""
        if not 0 <= job < self.jobs:
            raise ValueError(
                f"job {job} is out of range: the plan has {self.jobs} jobs"
            )
        return range(job * self.per_job, min((job + 1) * self.per_job, self.logical))


def logical_partitions(size_gb: float, size_mb: float) -> int:
    """Partitions of ``size_mb`` MiB that ``size_gb`` GiB of data make (rounded up)."""
    if size_gb <= 0:
        raise ValueError(f"data size must be > 0 GB, got {size_gb}")
    return math.ceil(size_gb * GIB / (size_mb * MIB))


def make_plan(
    physical: int,
    size_mb: float,
    size_gb: float | None,
    per_job: int,
    max_jobs: int,
) -> Plan:
    """Plan a run over ``physical`` stored partitions of ``size_mb`` MiB.

    Args:
        physical: Partition files the data set makes.
        size_mb: Partition size in MiB.
        size_gb: Data size to predict in GiB; None predicts the stored data once.
        per_job: Partitions per inference job asked for.
        max_jobs: Most inference jobs; ``per_job`` grows to stay within it.
    """
    if physical < 1:
        raise ValueError("the data set makes no partition")
    if per_job < 1 or max_jobs < 1:
        raise ValueError(
            f"per_job and max_jobs must be >= 1, got {per_job}, {max_jobs}"
        )
    logical = physical if size_gb is None else logical_partitions(size_gb, size_mb)
    return Plan(physical, logical, max(per_job, math.ceil(logical / max_jobs)))
