"""Errors of the data layer. Each names the file and line (or class) at fault."""


class DataError(ValueError):
    """Base class: the data on disk cannot be used as configured."""


class MissingDataError(DataError, FileNotFoundError):
    """A root folder, split file or image does not exist."""


class SplitFormatError(DataError):
    """A split or class-count file has a malformed line."""


class LabelRangeError(DataError):
    """A label lies outside [0, num_classes)."""


class EmptyClassError(DataError):
    """A class has no training image (its prior would be 0, log 0 in the balanced losses)."""


class ImageReadError(DataError):
    """An image is missing or cannot be decoded."""
