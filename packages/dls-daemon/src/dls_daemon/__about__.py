"""The version of dls-daemon, kept in one place for the build and the code."""

__version__ = "0.9.0"
