"""Renders documentation/OPTIONS.md from the option table.

Run `python -m simpletuner.config.docs` after changing the table; a test fails when the file is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simpletuner.config.options import GROUP_ORDER, OPTIONS

OUTPUT = Path(__file__).resolve().parents[2] / "documentation" / "OPTIONS.md"

HEADER = """# Options

Generated from the option table (`simpletuner/config/option_groups/`) by `python -m simpletuner.config.docs`.
Do not edit by hand.

Every option can be given on the command line (`--name=value`), in `config.json` or `config.toml`
(with or without the leading `--`), and some through `config.env` variables. Precedence:
defaults < config file < environment variables < command line.

Status: **built** options work; **planned** options are accepted by the parser but stop the run with
"not implemented yet" when set to anything but their default.
"""


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = [HEADER]
    for group in GROUP_ORDER:
        members = [o for o in OPTIONS.values() if o.group == group]
        if not members:
            continue
        lines += [f"## {group}", "", "| option | type | default | choices | status | what it does |",
                  "|---|---|---|---|---|---|"]
        for option in members:
            name = f"`--{option.name}`" + "".join(f"<br>alias `--{a}`" for a in option.aliases)
            choices = ", ".join(str(c) for c in option.choices) if option.choices else ""
            status = option.status + (" (required)" if option.required else "")
            if option.planned_choices:
                status += "; planned values: " + ", ".join(str(c) for c in option.planned_choices)
            if option.requires:
                status += f"; needs {option.requires}"
            if option.gated_choices:
                status += "; hardware-gated: " + ", ".join(str(c) for c in option.gated_choices)
            lines.append(f"| {name} | {option.kind} | {_cell(option.default)} | {_cell(choices)} | {_cell(status)} | "
                         f"{_cell(option.help)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
