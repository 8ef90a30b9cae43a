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
