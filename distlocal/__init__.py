"""distlocal: LoCal+SGD — selective localized (Hebbian) learning for faster, lighter CNN training."""

__version__ = "0.1.0"
