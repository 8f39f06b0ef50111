"""Results on disk and in markdown: atomic JSON + MD writes, table rows, number formatting."""

from __future__ import annotations

import json
import logging
import math
import pathlib

log = logging.getLogger("qvl.bench.report")


def fmt(x, template: str = "{:.2f}", none: str = "-") -> str:
    """``template.format(x)``, or ``none`` for a missing (None or NaN) figure."""
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else template.format(x)


def row(cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header, rows, align: str = "") -> list[str]:
    """A markdown table's lines; ``align`` has one letter a column, ``r`` for right-aligned."""
    seps = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return [row(header), "|" + "|".join(seps) + "|"] + [row(r) for r in rows]


def write_atomic(path: pathlib.Path, text: str) -> pathlib.Path:
    """Write ``text`` to ``path`` through a ``.part`` file and a rename: readers see all or nothing."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    tmp.rename(path)
    return path


def write_outputs(result, md: str, out: pathlib.Path, stem: str, suffix: str = "") -> tuple:
    """``out/stem.json`` and ``out/stem.md`` (each + ``suffix``), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{stem}.json{suffix}", out / f"{stem}.md{suffix}")
    for path, text in zip(paths, (json.dumps(result, indent=2) + "\n", md)):
        write_atomic(path, text)
    return paths


def write_partial(make, out: pathlib.Path, stem: str) -> None:
    """What is known so far, ``make() -> (result, md)``, as ``stem.partial.{json,md}.tmp``: names
    git ignores, so a run killed part way leaves its data without replacing an earlier complete
    result."""
    try:
        result, md = make()
        write_outputs(result, md, out, f"{stem}.partial", ".tmp")
    except Exception:  # noqa: BLE001 - a progress snapshot must never end the run
        log.exception("could not write the partial result")


def remove_partial(out: pathlib.Path, stem: str) -> None:
    for f in (out / f"{stem}.partial.json.tmp", out / f"{stem}.partial.md.tmp"):
        f.unlink(missing_ok=True)
