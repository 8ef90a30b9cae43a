class InputError(ValueError):
    """Bad input at this site. The message names the file and, where there is one, the key."""

    def __init__(self, file, problem, key=None):
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}, key '{key}'" if key else self.file
        super().__init__(f"{where}: {problem}")

    @property
    def short(self):
        """At most 40 characters, for the FeatureCloud status message."""
        name = self.file.rsplit("/", 1)[-1]
        text = f"bad input: {name}" + (f" {self.key}" if self.key else "")
        return text[:40]


class UserCodeError(InputError):
    """The site's own code (model file, dataset class, train function) raised SystemExit,
    KeyboardInterrupt or another BaseException that is not an Exception. Caught where the
    code runs, so that the site reports it instead of its state thread ending silently."""

    def __init__(self, file, problem, key=None, what=""):
        super().__init__(file, problem, key=key)
        self.what = what

    @property
    def short(self):
        name = self.file.rsplit("/", 1)[-1]
        text = f"{self.what} in {name}"
        return text if len(text) <= 40 else text[:39] + "…"


def user_code_exit(error, file, activity, key=None):
    """The UserCodeError for a BaseException `error` raised by user code while `activity`
    (e.g. "importing it"). Errors marked `passthrough` (the engine's watchdog unwinding a hung
    thread) are re-raised as they are: they are not the user code's doing."""
    if getattr(error, "passthrough", False) or isinstance(error, Exception):
        raise error
    what = f"sys.exit({error.code!r})" if isinstance(error, SystemExit) else type(error).__name__
    return UserCodeError(file, f"{activity} raised {what}: a site's code must not exit or "
                               f"interrupt the app (raise an exception instead)", key=key, what=what)
