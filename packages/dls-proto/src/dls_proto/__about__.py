"""The version of dls-proto, kept in one place for the build and the code."""

__version__ = "0.6.1"
