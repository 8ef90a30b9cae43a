"""Draw the app's state machine: `python -m tools.plot_states` writes docs/state_diagram.png
and the Graphviz source it was drawn from, docs/state_diagram.dot.

Like `featurecloud app plot-states`, it imports the states module (which registers every state
on the engine's module-level `app` through `app_state`), lets each state register its
transitions, and draws one node per state and one labelled edge per transition with pydot
(Graphviz's `dot` must be installed). Colours say which role may take a state or transition:
purple both, red the coordinator only, blue participants only; `initial` and `terminal` get a
double border.

The PNG carries the SHA-256 of that DOT source in a PNG text chunk (`dot-sha256`), so a test
can regenerate the graph from states.py and tell whether the committed picture is stale.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import struct
import sys
import zlib
from pathlib import Path

import pydot

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATES_MODULE = "states"
DEFAULT_OUTPUT = REPOSITORY_ROOT / "docs" / "state_diagram.png"
# (participant, coordinator) -> colour, the same code FeatureCloud's own diagrams use
ROLE_COLORS = {(True, True): "purple", (False, True): "red", (True, False): "blue"}
END_STATES = ("initial", "terminal")
DIGEST_KEY = "dot-sha256"


def load_app(states_module: str = DEFAULT_STATES_MODULE):
    """Import the states module and return the engine's app with all transitions registered."""
    if str(REPOSITORY_ROOT) not in sys.path:
        sys.path.insert(0, str(REPOSITORY_ROOT))
    try:
        importlib.import_module(states_module)
    except ImportError as error:
        raise SystemExit(f"plot_states: cannot import states module '{states_module}': {error}")
    from FeatureCloud.app.engine.app import app
    # Transitions are registered once per process; main.py may have done it already.
    if not app.transitions:
        app.register()
    return app


def build_graph(app) -> pydot.Dot:
    """A directed graph of app.states (nodes) and app.transitions (edges labelled by label)."""
    # nodesep: room for the labels of the two edges of a loop between neighbouring states
    graph = pydot.Dot("state_diagram", graph_type="digraph", rankdir="TB", nodesep=1.2,
                      fontname="Helvetica")
    for name in _flow_order(app.states):
        state = app.states[name]
        node = pydot.Node(name, label=name, shape="box", style="rounded", fontname="Helvetica",
                          color=ROLE_COLORS[(state.participant, state.coordinator)])
        if name in END_STATES:
            node.set("peripheries", 2)
        graph.add_node(node)
    for name, (source, target, participant, coordinator, label) in app.transitions.items():
        graph.add_edge(pydot.Edge(source.name, target.name, label=label or name,
                                  fontname="Helvetica", fontsize=10,
                                  color=ROLE_COLORS[(participant, coordinator)]))
    return graph


def _flow_order(state_names):
    """initial first and terminal last: dot lays nodes out from the first one it meets, and the
    engine registers terminal before any app state."""
    middle = [name for name in state_names if name not in END_STATES]
    return [name for name in ("initial", *middle, "terminal") if name in state_names]


def dot_digest(dot_source: str) -> str:
    """What the PNG records of the graph it shows: the SHA-256 of its DOT source."""
    return hashlib.sha256(dot_source.encode("utf-8")).hexdigest()


def with_text_chunk(png: bytes, key: str, value: str) -> bytes:
    """The PNG with a tEXt chunk (key, value) inserted before its final IEND chunk."""
    iend = png.rindex(b"IEND") - 4            # the chunk starts with its 4-byte length
    body = b"tEXt" + key.encode("latin-1") + b"\0" + value.encode("latin-1")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:iend] + chunk + png[iend:]


def main(argv=None) -> Path:
    arguments = _parse(argv)
    graph = build_graph(load_app(arguments.states))
    source = graph.to_string()
    dot_path = arguments.dot or arguments.out.with_suffix(".dot")
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    dot_path.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_bytes(with_text_chunk(graph.create_png(), DIGEST_KEY, dot_digest(source)))
    dot_path.write_text(source, encoding="utf-8")
    print(f"state diagram written to {arguments.out} (source: {dot_path})")
    return arguments.out


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.plot_states", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", default=DEFAULT_STATES_MODULE,
                        help="module that registers the states (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT,
                        help="PNG to write (default: docs/state_diagram.png)")
    parser.add_argument("--dot", type=Path,
                        help="where to write the Graphviz DOT source (default: OUT with .dot)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
