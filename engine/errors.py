"""The one base class of every error a person can act on.

Its message is shown as is (no traceback): it names the file, entry or key and says what
to do. The runner and the command line tell these apart from bugs by class, never by
the class name or the message text.
"""

from __future__ import annotations


class PersonaError(Exception):
    """A problem with the person's files, settings or environment; ``str()`` says what to do."""
