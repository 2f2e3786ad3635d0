"""ReftConfig: which interventions go where, as a JSON-serializable dataclass."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..modules import INTERVENTIONS

COMPONENTS = ("block_output",)
MAX_POSITIONS = 2**20  # first/last token counts a positions string may ask for (2^20 tokens)
_POSITIONS = re.compile(r"f(\d+)\+l(\d+)|f(\d+)|l(\d+)")


def intervention_key(layer: int, group: str) -> str:
    """The name of the intervention at block ``layer`` for position group ``group`` (``"first"``,
    ``"last"``, ``"shared"`` or ``"all"``): its key in ``ReftModel.interventions`` and the prefix of
    its tensors in a saved adapter, e.g. ``intervention_key(3, "last") == "layer3_last"``."""
    return f"layer{layer}_{group}"


@dataclass(frozen=True)
class Positions:
    """Parsed positions string: the first ``first`` and last ``last`` real tokens, or all tokens."""

    first: int = 0
    last: int = 0
    all_tokens: bool = False

    @classmethod
    def parse(cls, text: str) -> Positions:
        """``"f{p}+l{s}"`` (either part may be left out, e.g. ``"l1"``) or ``"all"``."""
        if text == "all":
            return cls(all_tokens=True)
        match = _POSITIONS.fullmatch(text) if isinstance(text, str) else None
        if not match:
            raise ValueError(
                f"positions must be 'f<p>+l<s>', 'f<p>', 'l<s>' or 'all', got {text!r}"
            )
        first_both, last_both, first_only, last_only = match.groups()
        first, last = int(first_both or first_only or 0), int(last_both or last_only or 0)
        if first + last == 0:
            raise ValueError(f"positions select no token: {text!r}")
        if max(first, last) > MAX_POSITIONS:  # refused here, not as a huge index tensor later
            raise ValueError(
                f"positions: at most {MAX_POSITIONS} first and last tokens each, got {text!r}"
            )
        return cls(first, last)

    def groups(self, share_weights: bool) -> tuple[str, ...]:
        """Names of the position groups that get their own intervention in a layer."""
        if self.all_tokens:
            return ("all",)
        named = tuple(name for name, n in (("first", self.first), ("last", self.last)) if n > 0)
        return ("shared",) if share_weights and len(named) > 1 else named


@dataclass
class ReftConfig:
    """Where and which ReFT interventions to attach to a Hugging Face model.

    Every field's help text is in its ``metadata["help"]`` (``dataclasses.fields``), as in PEFT.
    """

    layers: list[int] | str = field(metadata={"help": "block indices, or 'all'"})
    rank: int = field(default=4, metadata={"help": "r of every intervention"})
    intervention: str = field(
        default="loreft",
        metadata={"help": "a name of reft_ext.modules.INTERVENTIONS: " + ", ".join(INTERVENTIONS)},
    )
    positions: str = field(
        default="f1+l1",
        metadata={
            "help": "'f<p>+l<s>' (first p and last s real tokens of each sequence), 'f<p>', "
            "'l<s>' or 'all'; calls may override it with explicit intervention_locations"
        },
    )
    component: str = field(
        default="block_output",
        metadata={"help": "where to edit: 'block_output' (the hidden state a block returns)"},
    )
    share_weights: bool = field(
        default=False,
        metadata={"help": "one intervention per layer for the first and last positions"},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the edit (not on h) in training, in [0, 1)"}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "parameter dtype name ('float32', 'bfloat16', ...); None: float32"},
    )
    orthogonality: str | None = field(
        default="retraction",
        metadata={
            "help": "'retraction' (R retracted after each optimizer step), 'parametrization' "
            "(torch's, as pyreft), 'householder' (the same function in O(d·r²)) or None; only "
            "for interventions whose R is orthonormal"
        },
    )

    def __post_init__(self):
        if self.layers != "all" and not (
            isinstance(self.layers, (list, tuple))
            and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise ValueError(f"layers must be a list of ints or 'all', got {self.layers!r}")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if self.layers != "all" and (not self.layers or len(set(self.layers)) != len(self.layers)):
            # a repeated layer would hook its block twice and apply the intervention twice
            raise ValueError(f"layers must be non-empty and without repeats, got {self.layers!r}")
        # bool is checked by type: a truthy string such as "no" must not turn sharing on
        if not isinstance(self.share_weights, bool):
            raise TypeError(f"share_weights must be True or False, got {self.share_weights!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.intervention not in INTERVENTIONS:
            raise ValueError(
                f"intervention must be one of {tuple(INTERVENTIONS)}, got {self.intervention!r}"
            )
        if self.component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32', got {self.dtype!r}")
        Positions.parse(self.positions)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype) if self.dtype else torch.float32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ReftConfig:
        """The config of ``values`` (as :meth:`to_dict` writes); unknown keys raise ValueError."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ReftConfig: unknown field(s) {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ReftConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ReftConfig:
        return cls.from_json(Path(path).read_text())
