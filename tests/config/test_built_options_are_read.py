"""An option marked built must be read somewhere in the trainer's code (not only in the option table).

A cheap guard against the worst kind of defect: an option that is accepted, documented as working,
and silently ignored. Options read under a computed name list the text that reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

from simpletuner.config.options import OPTIONS

PACKAGE = Path(__file__).resolve().parents[2] / "simpletuner"
SKIP = ("option_groups", "wizard", "docs.py")
# option -> text in the code that reads it under a computed name, or why it needs no reader
READ_INDIRECTLY = {
    **{f"text_encoder_{n}_precision": "text_encoder_{" for n in range(1, 5)},
    "checkpointing_use_tempdir": "accepted for compatibility: checkpoints are always written to a temporary folder",
}


def package_code() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")
                     if not any(part in str(p) for part in SKIP))


def test_every_built_option_is_read():
    code = package_code()
    unread = []
    for name, option in OPTIONS.items():
        if option.status != "built":
            continue
        if name in READ_INDIRECTLY:
            witness = READ_INDIRECTLY[name]
            if witness.startswith("accepted for compatibility"):
                assert "compatibility" in option.help, name
            else:
                assert witness in code, f"{name}: expected the code to contain {witness!r}"
            continue
        if not re.search(rf"\b{re.escape(name)}\b", code):
            unread.append(name)
    assert not unread, f"built options that no code reads: {unread}"
