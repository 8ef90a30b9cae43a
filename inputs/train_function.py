"""An optional user file with `train(model, train_loader, epochs, learning_rate)` that replaces
the default training loop (training/loop.py shows the template)."""
import inspect

from inputs.errors import InputError, user_code_exit
from inputs.model_file import import_python_file

REQUIRED_ARGUMENTS = ("model", "train_loader", "epochs", "learning_rate")


def load_train_function(path, key="train_function"):
    """Import the file and return its `train`, checked to accept the four required arguments."""
    module = import_python_file(path, key)
    if not hasattr(module, "train"):
        raise InputError(path, "defines no function 'train(model, train_loader, epochs, learning_rate)'",
                         key=key)
    function = module.train
    if not callable(function):
        raise InputError(path, f"'train' is a {type(function).__name__}, not a function", key=key)
    problem = _binding_problem(function, REQUIRED_ARGUMENTS, {})
    if problem:
        raise InputError(path, f"train must accept ({', '.join(REQUIRED_ARGUMENTS)}): {problem}", key=key)
    return function


def check_train_function_supports(function, keywords, path, key="train_function"):
    """`keywords`: name -> why the config needs it. A train function that cannot take one of
    them would silently train without what the federation believes it applies."""
    for name, reason in keywords.items():
        if not accepts_keyword(function, name):
            raise InputError(path, f"{reason}, but train() accepts no {name}= keyword "
                             "(see training/loop.py)", key=key)


def accepts_keyword(function, name):
    """Whether `function` can be called with `name=` (named, or taken by its **kwargs)."""
    return _binding_problem(function, (), {name: None}, partial=True) is None


def _binding_problem(function, arguments, keywords, partial=False):
    """Why `function` cannot be called with these arguments, or None."""
    try:
        signature = inspect.signature(function)
    except ValueError:
        return None  # no readable signature (a builtin): trust it
    try:
        (signature.bind_partial if partial else signature.bind)(*arguments, **keywords)
    except TypeError as error:
        return str(error)
    return None


def call_train_function(fn, model, train_loader, epochs, learning_rate, **extras):
    """Call `fn` with the four required arguments, plus each extra keyword (optimizer=, device=)
    that its signature names or that its **kwargs can take; returns what `fn` returns.
    SystemExit, KeyboardInterrupt and the like from it become a UserCodeError naming its file."""
    arguments = _accepted(fn, extras)
    try:
        return fn(model, train_loader, epochs, learning_rate, **arguments)
    except Exception:
        raise
    except BaseException as error:
        raise user_code_exit(error, _source_file(fn), "train()", "train_function") from None


def _source_file(fn):
    try:
        return inspect.getsourcefile(fn) or "train_function"
    except TypeError:
        return "train_function"


def _accepted(fn, extras):
    try:
        parameters = inspect.signature(fn).parameters
    except ValueError:
        return {}  # no readable signature: pass only what every train function takes
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return extras
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: value for name, value in extras.items()
            if name in parameters and parameters[name].kind in keyword_kinds}
