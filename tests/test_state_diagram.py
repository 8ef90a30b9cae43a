"""`python -m tools.plot_states`: a PNG, and DOT source with every state and transition label;
the committed diagram is the one states.py gives today.

Each run happens in a fresh process: the engine's `app` is a module-level singleton, so
states registered in this test process would leak into other tests.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import pydot
import pytest
from PIL import Image

from tools.plot_states import DIGEST_KEY, dot_digest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
# pydot's DOT parser still calls pyparsing's old camelCase names: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'.*' deprecated - use:DeprecationWarning")

# Prints {"states": {name: [participant, coordinator]}, "transitions": [[source, target, label,
# participant, coordinator]]} straight from the engine, without the tool under test.
DUMP_REGISTRY = textwrap.dedent("""
    import importlib, json, sys
    importlib.import_module(sys.argv[1])
    from FeatureCloud.app.engine.app import app
    if not app.transitions:
        app.register()
    print(json.dumps({
        "states": {name: [s.participant, s.coordinator] for name, s in app.states.items()},
        "transitions": [[t[0].name, t[1].name, t[4] or name, t[2], t[3]]
                        for name, t in app.transitions.items()],
    }))
""")

TINY_STATES = textwrap.dedent("""
    from FeatureCloud.app.engine.app import AppState, Role, app_state

    @app_state("initial", Role.BOTH)
    class Start(AppState):
        def register(self):
            self.register_transition("gather", Role.COORDINATOR, label="is coordinator")
            self.register_transition("wait", Role.PARTICIPANT, label="is participant")
        def run(self):
            pass

    @app_state("gather", Role.COORDINATOR)
    class Gather(AppState):
        def register(self):
            self.register_transition("terminal", Role.COORDINATOR, label="sum broadcast")
        def run(self):
            pass

    @app_state("wait", Role.PARTICIPANT)
    class Wait(AppState):
        def register(self):
            self.register_transition("terminal", Role.PARTICIPANT)  # no label: name is shown
        def run(self):
            pass
""")


@pytest.fixture(scope="session")
def graphviz():
    assert shutil.which("dot"), ("Graphviz's dot is needed to draw the diagram: "
                                 "run tools/setup_system.sh (make test does)")


def run_python(arguments, extra_path=None):
    environment = dict(os.environ)
    if extra_path:
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(extra_path), environment.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, *arguments], cwd=REPOSITORY_ROOT, env=environment,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def draw(tmp_path, states_module, extra_path=None):
    """Run the tool; return (png path, parsed DOT graph)."""
    png, dot = tmp_path / "diagram.png", tmp_path / "diagram.dot"
    run_python(["-m", "tools.plot_states", "--states", states_module,
                "--out", str(png), "--dot", str(dot)], extra_path)
    (graph,) = pydot.graph_from_dot_data(dot.read_text())
    return png, graph


def registry(states_module, extra_path=None):
    return json.loads(run_python(["-c", DUMP_REGISTRY, states_module], extra_path))


def drawn_states(graph):
    return {node.get_name().strip('"') for node in graph.get_nodes()} - {"node", "edge", "graph"}


def drawn_transitions(graph):
    return {(edge.get_source().strip('"'), edge.get_destination().strip('"'),
             edge.get("label").strip('"')) for edge in graph.get_edges()}


def assert_valid_png(path):
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.05, "the diagram is blank"


def test_diagram_of_the_apps_states_holds_every_state_and_transition_label(graphviz, tmp_path):
    expected = registry("states")
    png, graph = draw(tmp_path, "states")
    assert_valid_png(png)
    assert drawn_states(graph) == set(expected["states"])
    assert drawn_transitions(graph) == {tuple(t[:3]) for t in expected["transitions"]}
    # the lead's state machine, as ARCHITECTURE.md draws it
    assert {"initial", "local_train", "aggregate", "quantize", "write_results",
            "terminal"} <= drawn_states(graph)


def test_roles_are_coloured_and_unlabelled_transitions_show_their_name(graphviz, tmp_path):
    (tmp_path / "tiny_states.py").write_text(TINY_STATES)
    png, graph = draw(tmp_path, "tiny_states", extra_path=tmp_path)
    assert_valid_png(png)
    expected = registry("tiny_states", extra_path=tmp_path)
    assert drawn_transitions(graph) == {tuple(t[:3]) for t in expected["transitions"]}
    assert ("wait", "terminal", "wait_terminal") in drawn_transitions(graph)
    colors = {node.get_name(): node.get("color") for node in graph.get_nodes()}
    assert colors["gather"] == "red" and colors["wait"] == "blue"
    assert colors["initial"] == "purple"
    end_borders = {node.get_name(): node.get("peripheries") for node in graph.get_nodes()}
    assert end_borders["initial"] == end_borders["terminal"] == "2"


def test_committed_diagram_is_drawn_from_todays_states(graphviz, tmp_path):
    committed_png = REPOSITORY_ROOT / "docs" / "state_diagram.png"
    committed_dot = REPOSITORY_ROOT / "docs" / "state_diagram.dot"
    assert_valid_png(committed_png)
    draw(tmp_path, "states")
    regenerated = (tmp_path / "diagram.dot").read_text(encoding="utf-8")
    stale = "docs/state_diagram.* are stale: run `python -m tools.plot_states` and commit them"
    assert committed_dot.read_text(encoding="utf-8") == regenerated, stale
    assert Image.open(committed_png).text.get(DIGEST_KEY) == dot_digest(regenerated), stale


def test_the_png_records_the_graph_it_shows_and_a_changed_label_changes_it(graphviz, tmp_path):
    """A renamed transition label in the states module makes the check above fail."""
    digests = []
    for label in ("sum broadcast", "sum sent"):
        run_dir = tmp_path / label.replace(" ", "_")
        run_dir.mkdir()
        (run_dir / "tiny_states.py").write_text(TINY_STATES.replace("sum broadcast", label))
        png, graph = draw(run_dir, "tiny_states", extra_path=run_dir)
        source = (run_dir / "diagram.dot").read_text(encoding="utf-8")
        assert ("gather", "terminal", label) in drawn_transitions(graph)
        assert Image.open(png).text[DIGEST_KEY] == dot_digest(source)
        digests.append(dot_digest(source))
    assert digests[0] != digests[1]
