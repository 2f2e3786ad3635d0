"""Markdown tables: the one writer, and the benchmark's tables as views of its measurements."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .record import Measurement, group_by_case


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table: ``header`` then one line per row, cells rendered with ``str``.

    Raises ValueError when a row's length differs from the header's.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"rows[{i}] has {len(row)} cells, expected {len(header)} (the header's)"
            )
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Column:
    """A column computed from one case's provider medians (seconds), e.g. a speedup.

    ``value`` gets ``{provider: median}`` holding at least ``providers`` and returns a number, or
    None where it is undefined; ``fmt`` renders the number. The column is left out of a table
    none of whose cases measured all of ``providers``, and shows ``-`` in a row that lacks one.
    """

    label: str
    providers: tuple[str, ...]
    value: Callable[[dict[str, float]], float | None]
    fmt: Callable[[float], str]


def ratio(numerator: str, denominator: str) -> Column:
    """``numerator``'s median ÷ ``denominator``'s, as ``2.50x`` (a speedup of ``denominator``)."""
    return Column(
        f"{numerator}/{denominator}",
        (numerator, denominator),
        lambda m: m[numerator] / m[denominator],
        "{:.2f}x".format,
    )


def format_ms(seconds: float) -> str:
    """Milliseconds with 3 decimals below 10 ms, 2 below 100 ms, else 1."""
    ms = seconds * 1e3
    return f"{ms:.{3 if ms < 10 else 2 if ms < 100 else 1}f}"


def format_column(column: Column, medians: dict[str, float]) -> str:
    if any(p not in medians for p in column.providers):
        return "-"
    value = column.value(medians)
    return "-" if value is None else column.fmt(value)


def suite_table(measurements: Iterable[Measurement], suite: str, columns: Sequence[Column]) -> str:
    """``suite``'s measurements as a table: one row per case, in measuring order.

    Columns: the case's parameters; the median in ms of every provider measured (in measuring
    order; ``-`` where a case lacks one); ``columns``; each provider's peak memory in MiB. An
    empty string when ``suite`` has no measurements.
    """
    cases = group_by_case(measurements, suite)
    if not cases:
        return ""
    providers = list(dict.fromkeys(p for _, by_provider in cases for p in by_provider))
    shown = [c for c in columns if all(p in providers for p in c.providers)]
    header = [
        *cases[0][0],
        *(f"{p} ms" for p in providers),
        *(c.label for c in shown),
        f"peak MiB ({' / '.join(providers)})",
    ]
    rows = []
    for params, by_provider in cases:
        medians = {p: m.value for p, m in by_provider.items()}
        peaks = (by_provider[p].peak_bytes / 2**20 if p in by_provider else None for p in providers)
        rows.append(
            [
                *params.values(),
                *(format_ms(medians[p]) if p in medians else "-" for p in providers),
                *(format_column(c, medians) for c in shown),
                " / ".join("-" if b is None else f"{b:.1f}" for b in peaks),
            ]
        )
    return markdown_table(header, rows)
