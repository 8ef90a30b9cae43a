"""Local FeatureCloud testbed: each site a process, this package plays the controller.

`python -m testbed --help` for the CLI; `run_federation` for tests and benchmarks.
"""
from testbed.runner import FederationResult, run_federation

__all__ = ["FederationResult", "run_federation"]
