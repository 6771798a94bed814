"""Exceptions for user errors (bad model, batch or losses); the CLIs print them in one line."""


class BlockfinderError(Exception):
    """A user-facing error: the message is one line saying what is wrong, where, and what to do."""


class LossError(BlockfinderError):
    """The losses callable raised, returned a non-mapping, or a loss is not a finite scalar."""


class ModelRunError(BlockfinderError):
    """The model could not run on the batch."""


class OptionError(BlockfinderError, ValueError):
    """A model option (``OPTIONS`` of a model file, set with ``--model-arg``) has a value the
    model file cannot use: raised by model files, printed by the CLIs as one line."""


class CaptureError(BlockfinderError):
    """No capture strategy could produce a graph of the model."""


class RegularizerError(BlockfinderError):
    """Regularizers were named that are not among the losses (``unknown``; ``losses``: the
    loss names, so that a caller can say where the names came from)."""

    def __init__(self, unknown: tuple[str, ...], losses: tuple[str, ...]) -> None:
        self.unknown, self.losses = tuple(unknown), tuple(losses)
        super().__init__(
            f"unknown regularizer {', '.join(map(repr, self.unknown))}: the losses are "
            f"{', '.join(self.losses)}"
        )
