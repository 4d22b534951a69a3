"""The calibration package's error classes, in one module that every other one imports (no import cycles)."""


class CalibrationError(ValueError):
    """A calibration sample that cannot be used; the message names the sample, says what is wrong and what to do."""


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""
