"""The errors a user can fix, apart from bugs.

    ADTRError          base: the CLI prints its message as one line and exits with status 2
      DataError        a data file or folder that cannot be used (adtr/data/)
      RunFolderError   a run folder that cannot be written or loaded (adtr/checkpoint.py)
      SettingsError    settings that make no sense (flags, configs, option combinations)
      ForgettingError  an update that would flag more of the old good images (adtr/update.py)

Every other exception is a bug: the CLI lets it end the process with its traceback (status 1).
The first three also derive from ValueError, which code written before this module caught.
"""

from __future__ import annotations


class ADTRError(Exception):
    """An error the user can fix; the message names the file or setting and the problem."""


class DataError(ADTRError, ValueError):
    """A data file or folder that cannot be used; the message names it."""


class RunFolderError(ADTRError, ValueError):
    """A run folder that cannot be loaded or written; the message names the file and the problem."""


class SettingsError(ADTRError, ValueError):
    """User settings that cannot work (a bad value or combination of options)."""


class ForgettingError(ADTRError):
    """An update refused by the forgetting guard; the message gives both false-alarm rates."""
