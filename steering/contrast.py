"""Contrastive vectors, the simple method: the same prompts with and without a suffix such as
"Respond tersely.", and the mean difference of their rows per layer (at the last prompt token,
as ds4 builds them, or over all tokens)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from activations.sites import Site
from steering.interventions import SteeringError
from steering.steerer import encode_prompt
from steering.vectors import SteeringVector, VectorError, unit_rows


def read_prompts(path: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped. `path` is a file, or
    the name of a prompt set shipped in steering/prompts/ (contrast.txt, heldout.txt)."""
    file = Path(path)
    if not file.is_file():
        shipped = resources.files("steering") / "prompts" / str(path)
        if not shipped.is_file():
            raise SteeringError(f"no prompt file {path}: give a text file with one prompt a line")
        file = shipped
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise SteeringError(f"{path} holds no prompts")
    return prompts


def contrast_prompts(c) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts of a contrast config: two files, or one file with and without the suffix."""
    if c.positive_file or c.negative_file:
        if not (c.positive_file and c.negative_file):
            raise SteeringError("give both contrast.positive_file and contrast.negative_file, or neither")
        return read_prompts(c.positive_file), read_prompts(c.negative_file)
    if not c.suffix:
        raise SteeringError("contrast.suffix is empty: give the instruction to contrast, e.g. 'Respond tersely.'")
    prompts = read_prompts(c.prompts)
    return [f"{p} {c.suffix}" for p in prompts], prompts


def build_contrast(c, steerer) -> SteeringVector:
    """The vector a contrast config describes, built on the steerer's model and saved in the run's vectors/."""
    positives, negatives = contrast_prompts(c)
    chat = steerer.chat_default if c.chat is None else c.chat
    encode = [[encode_prompt(steerer.tokenizer, p, chat) for p in group] for group in (positives, negatives)]
    layers = list(c.layers) or list(range(steerer.adapter.n_layers))
    source = {"suffix": c.suffix if not c.positive_file else "", "prompts": c.positive_file or c.prompts,
              "negative_prompts": c.negative_file or c.prompts}
    with torch.inference_mode():
        vector = contrast_vector(c.name, steerer.adapter, *encode, c.site_kind, layers, c.where, c.orthogonalize,
                                 c.operation, source)
    vector.save(steerer.run.vectors)
    return vector


def prompt_rows(adapter, prompts: list[torch.Tensor], sites: list[Site], where: str) -> dict:
    """{site: [n_prompts, width]}: each prompt's row at its last token (`last`) or averaged (`mean`).

    prompts: token ids [seq] each. One prompt per forward: no padding, so every prompt sees
    exactly its own positions.
    """
    if where not in ("last", "mean"):
        raise VectorError(f"contrast.where={where!r}: use last (the last prompt token, as ds4 does) or mean")
    rows = {site: [] for site in sites}
    for ids in prompts:
        captured = adapter.capture(sites, ids[None])
        for site in sites:
            x = captured[site][0].float()
            rows[site].append(x[-1] if where == "last" else x.mean(dim=0))
    return {site: torch.stack(r) for site, r in rows.items()}


def contrast_vector(name: str, adapter, positives: list[torch.Tensor], negatives: list[torch.Tensor], kind: str,
                    layers: list[int], where: str = "last", orthogonalize: bool = False, operation: str = "add",
                    source: dict | None = None) -> SteeringVector:
    """Mean(positive rows) - mean(negative rows) per layer; prompts are token ids [seq] each.

    orthogonalize: remove from each difference its component along the negative mean, so the
    vector does not simply rescale what every prompt already has.
    operation=project stores unit directions for ds4-style projection instead of the raw difference.
    """
    if not positives or not negatives:
        raise VectorError("contrastive vectors need positive and negative prompts: give contrast.suffix or two files")
    sites = [Site(layer, kind) for layer in layers]
    for site in sites:
        adapter.site(site)  # validates layer and kind against the model
    pos = prompt_rows(adapter, positives, sites, where)
    neg = prompt_rows(adapter, negatives, sites, where)
    directions = {}
    for site in sites:
        diff, neg_mean = pos[site].mean(0) - neg[site].mean(0), neg[site].mean(0)
        if orthogonalize:
            unit = neg_mean / neg_mean.norm().clamp_min(1e-12)
            diff = diff - (diff @ unit) * unit
        directions[site.layer] = unit_rows(diff) if operation == "project" else diff
    info = {"method": "contrast", "where": where, "orthogonalize": orthogonalize, "n_positive": len(positives),
            "n_negative": len(negatives), **(source or {})}
    return SteeringVector(name, kind, operation, "fraction" if operation == "project" else "raw", directions,
                          adapter.describe(), info)
