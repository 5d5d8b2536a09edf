"""The version of dls-utils, kept in one place for the build and the code."""

__version__ = "0.8.0"
