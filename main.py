"""Serve the app: FeatureCloud's controller API at /api, the live status page at /web.

Environment: FC_INPUT_DIR (default /mnt/input), FC_OUTPUT_DIR (default /mnt/output) and
FC_PORT (default 5000) let several sites run on one machine; FC_FAST_ENGINE=1 (set by the
testbed) shortens the engine's sleeps for local runs.
"""
import os

import bottle
from FeatureCloud.app.api.http_ctrl import api_server
from FeatureCloud.app.engine.app import app

import states  # noqa: F401  (registers the states with the engine's app)
from federation import engine
from webui import live_status, web_server


# The memos of ARCHITECTURE.md's message table; any other memo, or one from the wrong side,
# is refused naming its sender (federation/engine.py).
MESSAGES = {
    "to_coordinator": ["summary", r"update_\d+", r"test_\d+", "calibration", "results",
                       # secure_aggregation's sums (ARCHITECTURE.md, "Under secure_aggregation")
                       "counts", "calibration_range", r"dp_sum_\d+_\d+"],
    "from_coordinator": [r"global_\d+", r"round_\d+", "qparams", "final", "calibration_grid", r"dp_model_\d+_\d+"],
}


def main():
    fast = os.environ.get("FC_FAST_ENGINE") == "1"
    engine.install(fast=fast, on_error=lambda error: live_status.update(state="error", error=str(error)))
    engine.expect_messages(**MESSAGES)
    app.register()
    server = bottle.Bottle()
    server.mount("/api", api_server)
    server.mount("/web", web_server)
    server.run(host=os.environ.get("FC_HOST", "127.0.0.1"), port=int(os.environ.get("FC_PORT", 5000)),
               quiet=fast)


if __name__ == "__main__":
    main()
