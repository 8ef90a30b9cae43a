"""The coordinator's `final` message is checked at participants, through the real app."""
import testbed
from federation import payload
from tests.e2e_helpers import QUICK, SAMPLE_CLIENTS, make_generic


def test_fake_final_figures_stop_the_participant_naming_the_coordinator(tmp_path):
    def fake_final(sender, receiver, memo, data):
        if (sender, receiver, memo) != (1, 2, "final"):
            return data
        _, meta = payload.decode(data, "test")
        meta["figures"]["int8"]["accuracy"] = 99.9
        return payload.encode({}, meta)

    generic = make_generic(tmp_path / "generic", QUICK)
    result = testbed.run_federation(SAMPLE_CLIENTS, generic, tmp_path / "out", quiet=True, timeout=180,
                                    relay_filter=fake_final)
    assert not result.ok and result.failed_site == 2
    log = result.log_paths[1].read_text()
    assert "sent a 'final' report whose 'figures.int8.accuracy' is 99.9: expected a number in [0, 1]" in log
    assert not (result.site_outputs[1] / "metrics.json").exists()
