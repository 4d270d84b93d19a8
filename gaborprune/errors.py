"""The package's exceptions. The CLI turns each into one red line and exit code 1.

Messages name the library's arguments in backquotes (`batch_size`); the CLI shows its flags
instead (`gaborprune._flags.cli_message`).
"""

from __future__ import annotations


class GaborPruneError(Exception):
    """A problem the user can fix: the message names the bad value and what to do."""


class ModelSourceError(GaborPruneError):
    """A model spec, weights file or model argument that cannot be used."""


class RecipeError(GaborPruneError):
    """A recipe file that is missing, corrupt, unsafe or from an incompatible version."""


class ConversionError(GaborPruneError):
    """A conversion spec that is invalid or matches nothing convertible."""


class PruneError(GaborPruneError):
    """A prune request that cannot be carried out (bad criterion, no Gabor banks, a layer cut off)."""


class TrainingError(GaborPruneError):
    """Training cannot go on (non-finite loss, wrong classes, ...)."""


class OutputExistsError(GaborPruneError):
    """An output file exists and --force was not given."""


class ExportError(GaborPruneError):
    """The model cannot be exported, or the exported model does not compute what the model does."""


class SessionError(GaborPruneError):
    """ONNX Runtime cannot load or run a model as asked."""


class OnnxFileError(GaborPruneError):
    """An ONNX file that is missing, corrupt, or does not fit the data or options it is used with."""


class DataError(GaborPruneError):
    """A dataset spec or folder that cannot be used."""


class InputShapeError(GaborPruneError):
    """A model that cannot run on (or makes no sense at) the input shape it was given."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`gaborprune.train.interrupt`); a KeyboardInterrupt, so whatever handles Ctrl-C handles it too."""
