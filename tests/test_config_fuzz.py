"""Property: any YAML-like document is either a valid config or rejected with InputError."""
from hypothesis import given, settings
from hypothesis import strategies as st

from inputs.config import KNOWN_KEYS, AppConfig, InputError, parse_config

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**33), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["x86", "qnnpack", "fbgemm", "qat", "post_static",
                                                           "m.py", "train.pth"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers())
sections = st.dictionaries(keys, values, max_size=12)
documents = st.one_of(sections, st.fixed_dictionaries({"fc_quantization": sections | values}), values)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_validation_accepts_or_raises_input_error(document):
    try:
        config = parse_config(document, "config.yml")
    except InputError as error:
        assert str(error).startswith("config.yml")
    else:
        assert isinstance(config, AppConfig)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"model": st.just("m.py"), "train_dataset": st.just("a.pth"),
                              "test_dataset": st.just("b.pth")},
                             optional={"batch_size": st.integers(-3, 500), "epochs": st.integers(-3, 50),
                                       "learning_rate": st.floats(-1, 1), "backend": st.text(max_size=8)}))
def test_accepted_configs_satisfy_the_rules(document):
    try:
        config = parse_config(document)
    except InputError:
        return
    assert config.batch_size >= 1 and config.epochs > 0 and config.learning_rate > 0
    assert config.backend in ("fbgemm", "qnnpack", "x86")
