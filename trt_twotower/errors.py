"""The one base class of every error a user can cause.

A bad option, checkpoint, build directory, manifest, server address or request raises a
subclass of ``TwoTowerError`` whose message says what was wrong and what to do, so that the
command line can print it as one line and exit 1 instead of showing a traceback. Errors that
are bugs stay ordinary exceptions. This module imports nothing from the package, so every
stage can derive its errors from it.
"""


class TwoTowerError(Exception):
    """Something the user gave or set up is wrong; the message says what and how to fix it."""
