"""The one error type users see: a problem with what they gave us, and what to fix."""


class UserError(Exception):
    """Bad input (a path, a name, a manifest, a query): the message is one line that says what to fix.

    The CLI prints it without a traceback (unless ``--debug``). Every layer raises it, so it lives at the
    bottom of the import graph (cli -> analyses -> store, cli -> hookpoints -> store).

    >>> try:
    ...     hp.load("no/such/folder/")
    ... except hp.UserError as error:
    ...     print(error)
    model path no/such/folder/ does not exist
    """


def check_count(what: str, value) -> None:
    """A UserError unless ``value`` is a whole number of at least 1 (numpy integers too; not a bool): 2.5 tokens
    generated 3, a float batch size failed after the run was opened, ``"8"`` and None were TypeErrors.

    >>> check_count("batch size", 2.5)
    Traceback (most recent call last):
    hookpoints.errors.UserError: batch size must be a whole number of at least 1, not 2.5
    """
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < 1:
        raise UserError(f"{what} must be a whole number of at least 1, not {value!r}")
