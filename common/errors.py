"""Exceptions of the codec. Every message names the tensor, what was expected and what was found."""


class MXFP4Error(ValueError):
    """Base class: invalid input to the MXFP4/MXFP8 codec."""


class ShapeError(MXFP4Error):
    """A tensor has the wrong shape (K not a multiple of 32, scales not matching codes, ...)."""


class DTypeError(MXFP4Error):
    """A tensor has the wrong dtype."""


class NonFiniteError(MXFP4Error):
    """A tensor to quantize holds NaN or Inf and the caller did not ask for the profile's non-finite rule."""


class UnknownProfileError(MXFP4Error):
    """A profile name that the codec does not know."""


class CheckpointError(MXFP4Error):
    """A checkpoint whose files, metadata or tensors contradict each other or the codec contract (bad header, index,
    quantization_config, expert ids, reserved scale bytes). The message names the file or tensor."""


def describe(name: str | None) -> str:
    return f"tensor '{name}'" if name else "tensor"
