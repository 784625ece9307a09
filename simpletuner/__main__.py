"""`python -m simpletuner ...` runs the same command as the `simpletuner` script."""

from simpletuner.cli import entry

entry()
