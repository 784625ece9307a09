"""Storage backends behind one small interface (see base.py)."""

from simpletuner.data.storage.base import Storage
from simpletuner.data.storage.local import LocalStorage

__all__ = ["Storage", "LocalStorage"]
