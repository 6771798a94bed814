"""Exceptions for user errors (bad model, batch or losses); the CLIs print them in one line."""


class BlockfinderError(Exception):
    """A user-facing error: the message is one line saying what is wrong, where, and what to do."""


class LossError(BlockfinderError):
    """The losses callable raised, returned a non-mapping, or a loss is not a finite scalar."""


class ModelRunError(BlockfinderError):
    """The model could not run on the batch."""


class CaptureError(BlockfinderError):
    """No capture strategy could produce a graph of the model."""
