"""How many visual tokens a pruning stage keeps: one ``Budget`` for every pruner.

A budget is an absolute count (``keep=N``), a fraction (``keep_ratio``) or a paper's own number (DART's
``budget=128``, SparseVLM's schedules), and it applies to a *unit*: a batch row today, or each image of a
row. Papers disagree on what "64 tokens" means, so a method turns a paper budget into counts with its
own rule, while every kind ends in the same clamp: never more than the unit holds, never fewer than
zero (or than a floor the method needs, such as DART's image pivots). The units come from the forward's
visual layout (``vtc.state.VisualLayout``): a row, each image or video of a row, each frame (an image is
one frame), or each crop (an anyres tile; the base view with its newline tokens is one crop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from vtc import kernels
from vtc.config import MethodConfig, check_fraction, check_int

if TYPE_CHECKING:
    from vtc.state import VisualTokenState

Scope = Literal["row", "image", "frame", "crop"]
SCOPES: tuple[str, ...] = get_args(Scope)
#: A method's reading of a budget: ``[...]`` tokens in each unit -> ``[...]`` tokens to keep there.
Rule = Callable[[torch.Tensor], torch.Tensor]
#: Config fields that hold a budget, and the Budget field each one fills.
CONFIG_FIELDS = {"keep": "keep", "keep_ratio": "ratio", "budget": "paper", "schedule": "paper"}


def _scope_error(who: str, field: str, scope: Any) -> str | None:
    """The message for an unknown `scope` (given as `field`), or None when it is one of ``SCOPES``."""
    if scope not in SCOPES:
        return f"{who}: {field} must be one of {', '.join(map(repr, SCOPES))}; got {scope!r}."
    return None


@dataclasses.dataclass(frozen=True)
class Budget:
    """Visual tokens a stage keeps per unit: exactly one of ``keep``, ``ratio``, ``paper``.

    Attributes:
        keep: keep this many visual tokens per unit (all of them when a unit holds fewer).
        ratio: keep this fraction of each unit's visual tokens, rounded down.
        paper: a paper's budget (DART's 128, SparseVLM's 192, or a per-stage schedule), read by the
            method's rule: the papers count differently, and the presets reproduce their counts.
        scope: the unit: ``"row"`` (a batch row), ``"image"`` (each image or video of a row), ``"frame"``
            (each frame of a video; an image is one frame) or ``"crop"`` (each anyres tile, and the base
            view with the newline tokens; an image without tiles is one crop).
    """

    keep: int | None = None
    ratio: float | None = None
    paper: int | tuple[int, ...] | None = None
    scope: Scope = "row"

    def __post_init__(self) -> None:
        chosen = [f.name for f in dataclasses.fields(self) if f.name != "scope" and getattr(self, f.name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"Budget: set exactly one of keep, ratio, paper; got {', '.join(chosen) or 'none'}.")
        check_int("Budget", "keep", self.keep, 0, optional=True)
        check_fraction("Budget", "ratio", self.ratio, optional=True)
        error = _scope_error("Budget", "scope", self.scope)
        if error:
            raise ValueError(error)

    @property
    def kind(self) -> Literal["keep", "ratio", "paper"]:
        if self.keep is not None:
            return "keep"
        return "ratio" if self.ratio is not None else "paper"

    @property
    def keeps_everything(self) -> bool:
        """True when no unit can lose a token (``ratio=1``), so a method may skip its work."""
        return self.ratio == 1.0

    @classmethod
    def of(cls, config: MethodConfig) -> Budget:
        """The budget a method config holds (its ``keep`` / ``keep_ratio`` / paper field and ``budget_scope``)."""
        values = {CONFIG_FIELDS[k]: getattr(config, k) for k in CONFIG_FIELDS if getattr(config, k, None) is not None}
        if not values:
            raise ValueError(f"{config.method or type(config).__name__} has no budget setting (keep, keep_ratio).")
        return cls(**values, scope=getattr(config, "budget_scope", "row"))

    def resolve(
        self,
        n: torch.Tensor,
        *,
        paper: Rule | None = None,
        ratio: Rule | None = None,
        keep: Rule | None = None,
        at_least: torch.Tensor | int = 0,
    ) -> torch.Tensor:
        """Visual tokens to keep in units that hold `n` (any shape, one count per unit).

        Args:
            n: integer counts per unit (``[B]`` per row, ``[B, G]`` per image).
            paper: the method's rule for a paper budget (required when ``paper`` is set).
            ratio: the method's reading of a fraction, where its paper defines one (SparseVLM interpolates
                between its schedules); None rounds ``n * ratio`` down.
            keep: the method's reading of a count, where its paper defines one (SparseVLM reads ``keep=N``
                as its schedule for a budget of N); None keeps N.
            at_least: a floor per unit that the method needs (still capped at `n`).

        Returns:
            ``n``'s shape: ``min(max(target, at_least), n)``, never negative.
        """
        if self.kind == "keep":
            target = keep(n) if keep is not None else torch.full_like(n, self.keep)
        elif self.kind == "ratio":
            target = ratio(n) if ratio is not None else torch.floor(n.double() * self.ratio).long()
        else:
            if paper is None:
                raise ValueError(f"a paper budget ({self.paper!r}) needs the method's rule; use keep or keep_ratio.")
            target = paper(n)
        return torch.minimum(torch.maximum(target.long(), torch.as_tensor(at_least, device=n.device)), n).clamp(min=0)

    def units(self, state: VisualTokenState) -> torch.Tensor:
        """``[B, L]`` the unit of each slot, numbered ``0..G-1`` within each row in input order.

        Per row everything is unit 0; otherwise the layout's image (``media``), then its ``frame`` or
        ``crop`` within the image, name the unit. Non-visual slots get unit 0; callers count and pick
        among candidate (visual) slots only.
        """
        if self.scope == "row":
            return torch.zeros_like(state.index)
        unit = {"image": "image", "frame": "frame", "crop": "crop (anyres tile)"}[self.scope]
        if state.layout is None:
            raise ValueError(
                f"a budget per {unit} needs to know which {unit} each visual token belongs to, and this model "
                f"family does not report it; use budget_scope='row'."
            )
        media = state.layout.field("media")  # [B, L]: the image (or video) index within the row, -1 for text
        counted = state.visual & state.valid
        if bool((counted & (media < 0)).any()):
            raise ValueError(
                f"a budget per {unit} needs the image of every visual token, and the visual layout gives some "
                f"none; use budget_scope='row'."
            )
        if self.scope == "image":
            return torch.where(counted, media, 0)
        inner = state.layout.field("frame" if self.scope == "frame" else "crop") + 1  # crop -1 (base view) -> 0
        # Number the (media, frame or crop) pairs that occur in each row densely, in their sorted order.
        width = int(inner.max()) + 1 if inner.numel() else 1
        key = torch.where(counted, media * width + inner.clamp(min=0), -1)  # [B, L]
        units = torch.zeros_like(key)
        for b in range(key.shape[0]):
            present = key[b] >= 0
            if bool(present.any()):
                units[b, present] = torch.unique(key[b, present], return_inverse=True)[1]
        return units

    @staticmethod
    def count(mask: torch.Tensor, units: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[B, G]`` slots of `mask` (``[B, L]`` bool) in each unit (``[B, L]`` unit ids), G = `width` or enough."""
        if width is None:
            width = int(units.max()) + 1 if units.numel() else 1
        out = torch.zeros(units.shape[0], width, dtype=torch.long, device=units.device)
        return out.scatter_add_(1, units, mask.long())  # [B, L] -> [B, G]


def keep_top_k(
    scores: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, units: torch.Tensor | None = None
) -> torch.Tensor:
    """The one top-k-and-keep step: the `k` best candidates of each unit, ties to the lower index.

    Args:
        scores: ``[B, L]`` higher is better; read at candidate slots only.
        k: ``[B, G]`` (or ``[B]``) how many to keep in each unit; capped at the unit's candidates.
        candidates: ``[B, L]`` bool, slots that may be kept.
        units: ``[B, L]`` unit of each slot (None: one unit per row).

    Returns:
        ``[B, L]`` bool: the kept slots, a subset of `candidates`.
    """
    k = k[:, None] if k.dim() == 1 else k  # [B] -> [B, 1]
    if units is None and k.shape[1] > 1:
        raise ValueError(f"keep_top_k: {k.shape[1]} counts per row need `units` saying which slot is in which unit.")
    keep = torch.zeros_like(candidates)
    for g in range(k.shape[1]):
        pool = candidates if k.shape[1] == 1 else candidates & (units == g)
        picks = kernels.topk_gather(scores, k[:, g], valid=pool)  # indices [B, K] ascending, mask [B, K]
        keep |= torch.zeros_like(candidates).scatter(1, picks.indices, picks.mask)
    return keep & candidates


def check_budget(config: MethodConfig, method: str, *, default: dict[str, Any], min_keep: int = 0) -> None:
    """Validate a config's budget fields (its first ``exclusive`` group) and ``budget_scope``.

    At most one field of the group may be set; with none, `default` (one field and its value) applies.
    ``keep`` is an integer of at least `min_keep`, ``keep_ratio`` a number in (0, 1], ``budget`` an
    integer of at least 0. Other fields of the group (SparseVLM's ``schedule``) the method checks itself.

    Raises:
        ValueError: naming the method, the field, what it got and what is valid.
    """
    group = config.exclusive[0]
    chosen = [k for k in group if getattr(config, k) is not None]
    if len(chosen) > 1:
        raise ValueError(f"{method}: set only one of {', '.join(group)}; got {', '.join(chosen)}.")
    if not chosen:
        for name, value in default.items():
            object.__setattr__(config, name, value)
    if "keep" in group:
        check_int(method, "keep", config.keep, min_keep, optional=True)
    check_fraction(method, "keep_ratio", config.keep_ratio, optional=True)
    if "budget" in group:
        check_int(method, "budget", config.budget, 0, optional=True)
    error = _scope_error(method, "budget_scope", getattr(config, "budget_scope", "row"))
    if error:
        raise ValueError(error)
