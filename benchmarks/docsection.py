"""Rewrite a benchmark's marked section of a Markdown file (``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``)."""

from __future__ import annotations

from pathlib import Path


def write_section(
    doc: Path, name: str, command: str, machine: str, lines: list[str], heading: str, script: str | None = None
) -> None:
    """Put ``lines`` (the table) with the command and machine between the ``name`` markers of ``doc``.

    The raw figures are ``benchmarks/results/{script}.json``, written by ``benchmarks/{script}.py``
    (``script`` defaults to ``name``; one script may write several sections).
    Without markers, a new ``## heading`` section is appended.
    """
    script = script or name
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = "\n".join(
        [
            begin,
            "",
            f"Written by `benchmarks/{script}.py` (do not edit by hand); raw figures in "
            f"`benchmarks/results/{script}.json`.",
            "",
            f"    {command}",
            "",
            machine,
            "",
            *lines,
            "",
            end,
        ]
    )
    text = doc.read_text()
    if begin in text:
        text = text[: text.index(begin)] + body + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + body + "\n"
    doc.write_text(text)
