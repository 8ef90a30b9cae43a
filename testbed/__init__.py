"""Local FeatureCloud testbed: each site a process, this package plays the controller.

`python -m testbed --help` for the CLI; `run_federation` for tests and benchmarks.
"""
from testbed.relay import Delivery
from testbed.runner import FederationResult, run_federation

__all__ = ["Delivery", "FederationResult", "run_federation"]
