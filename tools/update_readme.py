"""Regenerate the spec reference in README.md from the schema (launcher/spec.py).

    .venv/bin/python tools/update_readme.py
"""

from pathlib import Path

from launcher.spec import spec_reference

START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"


def updated(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{spec_reference()}{END}{tail}"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    readme.write_text(updated(readme.read_text()))
