"""The version of dls-shm, kept in one place for the build and the code."""

__version__ = "0.10.0"
