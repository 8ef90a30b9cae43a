"""The site's model file: a .py file that defines an nn.Module class (by default `Model`)."""
import importlib.util
import inspect
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

from inputs.errors import InputError, user_code_exit

_module_numbers = itertools.count()


def import_python_file(path, key):
    """Import a user's .py file by path as a fresh module (a unique name per import, so two
    files both called model.py, or the same file loaded twice, never share a module)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found", key=key)
    name = f"fc_user_{key}_{next(_module_numbers)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses, pickling and typing look modules up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        del sys.modules[name]
        raise InputError(path, f"syntax error on line {error.lineno}: {error.msg}", key=key) from None
    except Exception as error:
        del sys.modules[name]
        raise InputError(path, f"importing it failed: {type(error).__name__}: {error}", key=key) from error
    except BaseException as error:  # sys.exit() or KeyboardInterrupt at import time
        sys.modules.pop(name, None)
        raise user_code_exit(error, path, "importing it", key) from None
    return module


def load_model(path, class_name="Model", kwargs=None, key="model") -> nn.Module:
    """Import the model file and return `class_name(**kwargs)`."""
    kwargs = dict(kwargs or {})
    module = import_python_file(path, key)
    model_class = getattr(module, class_name, None)
    if model_class is None:
        defined = _classes_defined_in(module)
        has = f"it defines {', '.join(defined)}" if defined else "it defines no classes"
        raise InputError(path, f"no class '{class_name}' ({has}); set model_class", key=key)
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise InputError(path, f"'{class_name}' is not a torch.nn.Module subclass", key=key)
    _check_arguments(model_class, kwargs, path, key)
    try:
        model = model_class(**kwargs)
    except Exception as error:
        raise InputError(path, f"{class_name}(**{kwargs!r}) failed: {type(error).__name__}: {error}",
                         key=key) from error
    except BaseException as error:
        raise user_code_exit(error, path, f"{class_name}()", key) from None
    return model


def _classes_defined_in(module):
    return sorted(name for name, value in vars(module).items()
                  if isinstance(value, type) and value.__module__ == module.__name__)


def _check_arguments(model_class, kwargs, path, key):
    """Name the constructor arguments that model_kwargs lacks or that the class does not take."""
    try:
        parameters = inspect.signature(model_class).parameters.values()
    except (TypeError, ValueError):
        return  # no signature to read (a C extension class): the call itself will tell
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [p.name for p in parameters
               if p.kind in keyword_kinds and p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise InputError(path, f"{model_class.__name__}() needs argument(s) {', '.join(missing)}: "
                               f"add them to model_kwargs", key=key)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    accepted = {p.name for p in parameters if p.kind in keyword_kinds}
    unknown = sorted(set(kwargs) - accepted)
    if unknown and not takes_any:
        raise InputError(path, f"{model_class.__name__}() takes no argument(s) {', '.join(unknown)} "
                               f"given in model_kwargs", key=key)


def check_model_on_data(model, inputs_batch, n_classes, model_path) -> int:
    """Run the model on a batch of this site's data before any training, so that a model that
    does not fit the data fails here with the shapes named, not deep inside a training round.
    Returns how many class scores the model gives per sample."""
    shape = tuple(inputs_batch.shape)
    was_training = model.training
    model.eval()  # eval: the check must not update batch-norm statistics
    try:
        with torch.no_grad():
            outputs = model(inputs_batch)
    except Exception as error:
        raise InputError(model_path, f"the model fails on this site's inputs of shape {list(shape)}: "
                                     f"{type(error).__name__}: {error}", key="model") from error
    except BaseException as error:
        raise user_code_exit(error, model_path, "the model's forward", "model") from None
    finally:
        model.train(was_training)
    if not isinstance(outputs, torch.Tensor):
        raise InputError(model_path, f"the model returns {type(outputs).__name__}, expected a tensor "
                                     f"of class scores [batch, classes]", key="model")
    if outputs.dim() != 2 or outputs.shape[0] != shape[0] or outputs.shape[1] < n_classes:
        raise InputError(model_path, f"the model's output has shape {list(outputs.shape)} for a batch of "
                                     f"{shape[0]}; expected [{shape[0]}, >= {n_classes}] since the labels "
                                     f"have {n_classes} classes", key="model")
    return outputs.shape[1]
