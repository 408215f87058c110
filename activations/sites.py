"""Site names and feature IDs: the one spelling every stage, report and export uses.

A site is `L<layer>.<kind>` (layer 0-based), a feature ID is `<site>/<index>`,
for example `L15.resid_post/1234`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from activations.errors import DialboxError



class SiteKind(StrEnum):
    resid_pre = "resid_pre"  # what enters block `layer`
    resid_post = "resid_post"  # what leaves block `layer`
    attn_in = "attn_in"  # what the attention sub-layer reads, before its norm
    attn_out = "attn_out"  # the attention output, before it is added back
    ffn_in = "ffn_in"  # what the FFN sub-layer reads, before its norm
    ffn_out = "ffn_out"  # the FFN output, before it is added back


SITE_KINDS = tuple(kind.value for kind in SiteKind)

_SITE_RE = re.compile(r"^L([0-9]+)\.([a-z_]+)$")  # ASCII digits: \d takes any script's


class SiteError(DialboxError, ValueError):
    """A site or feature ID that does not parse or does not exist in the model."""


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str

    @classmethod
    def parse(cls, text: str, n_layers: int | None = None) -> "Site":
        match = _SITE_RE.match(str(text).strip())
        if not match:
            raise SiteError(
                f"bad site {text!r}: write L<layer>.<kind>, e.g. L15.resid_post; kinds: {', '.join(SITE_KINDS)}"
            )
        site = cls(int(match.group(1)), match.group(2))
        site.check(n_layers)
        return site

    def check(self, n_layers: int | None = None) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r} in {self}: valid kinds are {', '.join(SITE_KINDS)}")
        if n_layers is not None and not 0 <= self.layer < n_layers:
            raise SiteError(f"layer {self.layer} out of range in {self}: this model has layers 0..{n_layers - 1}")

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}"


@dataclass(frozen=True, order=True)
class FeatureId:
    site: Site
    index: int

    @classmethod
    def parse(cls, text: str) -> "FeatureId":
        site_text, sep, index_text = str(text).strip().rpartition("/")
        if not sep or not (index_text.isascii() and index_text.isdigit()):  # "²" is a digit, not a number
            raise SiteError(f"bad feature ID {text!r}: write <site>/<index>, e.g. L15.resid_post/1234")
        return cls(Site.parse(site_text), int(index_text))

    def __str__(self) -> str:
        return f"{self.site}/{self.index}"


def parse_sites(texts, n_layers: int | None = None) -> list[Site]:
    """Parse a list of site names, rejecting duplicates, in a stable sorted order."""
    sites = [Site.parse(t, n_layers) for t in texts]
    if not sites:
        raise SiteError("no sites given: pass e.g. harvest.sites=[L15.resid_post]")
    if len(set(sites)) != len(sites):
        raise SiteError(f"duplicate sites in {[str(s) for s in sites]}: list each site once")
    return sorted(sites)
