"""python -m testbed: run the app on the sample sites and print fp32 vs int8 per site."""
import argparse
import signal
import sys
from pathlib import Path

from testbed.report import finished_line, summary
from testbed.runner import DEFAULT_APP, DEFAULT_QUERY_INTERVAL_S, DEFAULT_TIMEOUT_S, run_federation
from testbed.site import HTTP_TIMEOUT_S

SAMPLE_DIR = Path("data/sample")
DEFAULT_CLIENT_DIRS = [SAMPLE_DIR / f"client_{i}" for i in (1, 2, 3)]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m testbed",
        description="Run one FeatureCloud app instance per client dir as local processes and "
                    "play the controller between them. The first client dir is the coordinator. "
                    "The app gets FC_FAST_ENGINE=1 unless the environment sets it (e.g. to 0).")
    parser.add_argument("client_dirs", nargs="*", type=Path, default=DEFAULT_CLIENT_DIRS,
                        metavar="CLIENT_DIR", help="one site per dir (default: data/sample/client_1..3)")
    parser.add_argument("--out", type=Path, default=Path("results/testbed"),
                        help="where client_<i>/ outputs and logs/ go (default: %(default)s)")
    parser.add_argument("--generic", type=Path, default=SAMPLE_DIR / "generic",
                        help="dir merged into every site's input (default: %(default)s)")
    parser.add_argument("--query-interval", type=float, default=DEFAULT_QUERY_INTERVAL_S,
                        help="seconds between status polls (default: %(default)s; the real "
                             "FeatureCloud controller uses 2.0)")
    parser.add_argument("--app", type=Path, default=DEFAULT_APP,
                        help="the app's main.py (default: main.py at the repo root)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="give up on the whole run after this many seconds (default: %(default)s)")
    parser.add_argument("--response-timeout", type=float, default=HTTP_TIMEOUT_S,
                        help="a site that does not answer a call within this many seconds is "
                             "'not responding' (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Let `kill` clean up like Ctrl-C does: run_federation stops the sites on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run_federation(args.client_dirs, args.generic, args.out,
                                query_interval=args.query_interval, app=args.app,
                                timeout=args.timeout, response_timeout=args.response_timeout)
    except KeyboardInterrupt:
        print("interrupted: all sites stopped", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not result.ok:
        return 1
    print()
    print(summary(result.site_outputs))
    print(f"\n{finished_line(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
