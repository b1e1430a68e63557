"""zeroseg: the ZeroSeg method as a two-stage offline pipeline with a teacher feature cache."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeroseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
