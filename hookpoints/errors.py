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
