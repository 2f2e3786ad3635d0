"""The benchmark's one record: a measurement is one row, in long form (one provider, one metric).

``results.json`` holds ``{"machine": ..., "measurements": [Measurement, ...]}``; every table and
the PNG are views of those rows (reft_ext.bench.table, reft_ext.bench.plot), so nothing derived
(a speedup, an overhead) is stored beside the numbers it comes from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from .table import Column


@dataclass(frozen=True)
class Case:
    """A benchmark point; subclasses are dataclasses whose fields are the point's parameters.

    A subclass is one suite (one table): ``suite`` names it, ``title`` heads its table,
    ``columns`` are the table's derived columns, ``grid`` lists its points and ``calls`` builds
    the providers of one. The case's ``name`` is the suite followed by its parameters
    (``op-forward-N8192-d2048-r4-float32``), which ``--only`` matches.
    """

    suite: ClassVar[str]
    title: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]] = ()

    @classmethod
    def grid(cls, quick: bool) -> list[Case]:
        """The suite's points; ``quick``: the headline ones."""
        raise NotImplementedError

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        """One zero-argument callable per provider, in table order."""
        raise NotImplementedError

    def timing(self, repeats: int) -> dict:
        """Keyword arguments of reft_ext.bench.timing.time_interleaved for this suite."""
        return {"repeats": repeats}

    @property
    def params(self) -> dict:
        """The case's parameters, in field order: ``{"N": 8192, "d": 2048, ...}``."""
        return asdict(self)

    @property
    def name(self) -> str:
        parts = [v if isinstance(v, str) else f"{k}{v}" for k, v in self.params.items()]
        return "-".join([self.suite, *parts])


@dataclass(frozen=True)
class Measurement:
    """One provider's timing of one case: the long-form row of ``results.json``.

    ``value`` is the median, ``q1``/``q3`` the quartiles, all in ``unit``; ``samples`` is the number
    of timed calls; ``peak_bytes`` the provider's peak memory in one more, untimed call
    (reft_ext.bench.memory).
    """

    suite: str
    case: str
    params: dict
    provider: str
    metric: str
    unit: str
    value: float
    q1: float
    q3: float
    samples: int
    peak_bytes: int


def group_by_case(
    measurements: Iterable[Measurement], suite: str
) -> list[tuple[dict, dict[str, Measurement]]]:
    """``suite``'s measurements as (params, {provider: measurement}), one per case, in measuring
    order."""
    cases: dict[str, tuple[dict, dict[str, Measurement]]] = {}
    for m in measurements:
        if m.suite == suite:
            cases.setdefault(m.case, (m.params, {}))[1][m.provider] = m
    return list(cases.values())


def save_results(path: Path, machine: dict, measurements: list[Measurement]) -> None:
    """Write ``results.json``: the machine description and every measurement."""
    results = {"machine": machine, "measurements": [asdict(m) for m in measurements]}
    path.write_text(json.dumps(results, indent=2) + "\n")


def load_results(path: Path) -> tuple[dict, list[Measurement]]:
    """Read a ``results.json`` written by :func:`save_results`: (machine, measurements).

    Raises ValueError naming the file when it is not in this format.
    """
    results = json.loads(Path(path).read_text())
    names = {f.name for f in fields(Measurement)}
    rows = results.get("measurements") if isinstance(results, dict) else None
    if not isinstance(rows, list) or any(not isinstance(r, dict) or set(r) != names for r in rows):
        raise ValueError(
            f"{path}: expected a results.json of python -m reft_ext.bench, with a "
            f"'measurements' list of rows with the fields {sorted(names)}"
        )
    return results.get("machine", {}), [Measurement(**r) for r in rows]
