"""User-facing errors. The CLI prints these without a traceback and exits 2; bugs keep theirs."""


class KilnError(Exception):
    """A problem the user can fix: a bad spec field, a bad file, a missing model."""


class SpecError(KilnError):
    """The job spec is invalid; the message names the dotted field path."""


class DataError(KilnError):
    """The data cannot be used; the message names the file, column or row."""


class RegistryError(KilnError):
    """A model reference cannot be resolved, or a stored model failed verification."""


class TrainingError(KilnError):
    """Training could not finish (for example every retry after a worker failure was used).
    The CLI exits 1 for these, 2 for the other user errors."""
