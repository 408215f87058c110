"""Conditional steering: an edit that applies only where a feature fires, `when=L12.resid_post/88>2.5`.

CAST (IBM's activation-steering) gates a steering vector on a condition vector; here the condition is
an SAE feature, read on the same forward that is being steered. The condition's site hook encodes the
rows as they arrive there (before any edit at that site) and keeps a mask of the token positions where
the feature is above its threshold; every edit gated on it, at that site or a later one, then changes
only those positions. With a KV cache each forward carries only the new positions, so the mask always
lines up with the rows being edited.
"""

from __future__ import annotations

import torch

from activations.sites import SITE_KINDS, Site
from steering.interventions import Condition, Edit, SteeringError


def forward_rank(site: Site) -> tuple[int, int]:
    """Where a site's value is produced in a forward: by layer, then by sub-layer (SiteKind's order)."""
    return site.layer, SITE_KINDS.index(site.kind)


def check_order(condition: Condition, edited: Site) -> None:
    """A condition must be known by the time the edit runs: read at the edited site or before it."""
    if forward_rank(condition.feature.site) > forward_rank(edited):
        raise SteeringError(f"the condition {condition} is read at {condition.feature.site}, after the edited site "
                            f"{edited} in the forward: condition on a feature at or before {edited}")


class Gates:
    """The masks of one generation's conditions, for the forward under way."""

    def __init__(self, saes: dict[Condition, object]):
        self.saes = saes  # {condition: the SAE at its feature's site}
        self.masks: dict[Condition, torch.Tensor] = {}

    @classmethod
    def of(cls, edits: dict[Site, list[Edit]], sae_at) -> "Gates | None":
        """The gates the edits need (None when none is conditional); sae_at(site) gives a site's SAE."""
        conditions = {e.condition for site_edits in edits.values() for e in site_edits if e.condition is not None}
        return cls({c: sae_at(c.feature.site) for c in conditions}) if conditions else None

    @property
    def sites(self) -> set[Site]:
        return {c.feature.site for c in self.saes}

    def read(self, site: Site, rows: torch.Tensor) -> None:
        """Set the mask [batch, seq] of each condition at this site from the rows arriving there."""
        for condition, sae in self.saes.items():
            if condition.feature.site == site:
                flat = rows.float().reshape(-1, rows.shape[-1])
                active = sae.encode(flat)[:, condition.feature.index].reshape(rows.shape[:-1])
                # a position fires when the feature does in any of its rows (hyper-connection streams)
                self.masks[condition] = active.reshape(*active.shape[:2], -1).amax(-1) > condition.threshold

    def gate(self, condition: Condition, rows: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        """edited where the condition holds, rows elsewhere (exactly: a select, no arithmetic)."""
        mask = self.masks[condition]
        return torch.where(mask.reshape(*mask.shape, *(1,) * (rows.ndim - mask.ndim)), edited, rows)
