"""Find and remove backdoors in diffusion models (Diff-Cleanse and its neighbours)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffcleanse")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
