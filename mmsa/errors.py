"""User-facing errors: each carries one line that names the file or key and the problem.

CLI edges catch `UserError`, print its message on one line and exit with status 2.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input from the user (a file, a config key, an id). Exit status 2, no traceback."""


class DataError(UserError):
    """The dataset folder or one of its files is unusable."""


class DiskFullError(UserError):
    """No room on the device for a file being written; the message names the folder."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the OSError errnos that mean "no room left"


class ConfigError(UserError):
    """A config or search-space file, or a `--set` override, is invalid."""
