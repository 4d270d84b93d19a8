"""The package's exceptions. The CLI turns each into one red line and exit code 1."""

from __future__ import annotations


class GaborPruneError(Exception):
    """A problem the user can fix: the message names the bad value and what to do."""


class ModelSourceError(GaborPruneError):
    """A model spec, weights file or model argument that cannot be used."""


class RecipeError(GaborPruneError):
    """A recipe file that is missing, corrupt, unsafe or from an incompatible version."""


class ConversionError(GaborPruneError):
    """A conversion spec that is invalid or matches nothing convertible."""


class OutputExistsError(GaborPruneError):
    """An output file exists and --force was not given."""
