"""An SAE feature as a steering quantity: its max activation (the unit of feature scales) and its
decoder row saved as a named vector, without loading the model."""

from __future__ import annotations

import torch

from activations.rundir import RunDir
from activations.sites import FeatureId
from activations.store import StoreError
from steering.interventions import SteeringError
from steering.vectors import SteeringVector, feature_vector


def max_activations(run: RunDir, site: str, sae, rows: int = 16384) -> tuple[torch.Tensor, str]:
    """Each feature's max activation [d_sae] and where it came from: the label stage's feature
    table when there is one, else the max over the store's first `rows` rows."""
    columns = run.feature_table(site, ["index", "max_act"])
    if columns is not None:
        maxes = torch.zeros(sae.cfg.d_sae)
        maxes[torch.tensor(columns["index"], dtype=torch.long)] = torch.tensor(columns["max_act"], dtype=torch.float32)
        return maxes, f"{run.feature_table_path(site)}"
    try:
        store = run.open_store()
        n = min(rows, store.n_tokens)
        x = torch.from_numpy(store.read(site, 0, n))
    except StoreError as e:
        raise SteeringError(f"no feature table and no stored activations to find max activations at {site} ({e}): "
                            "run `make label`, or pass units=raw") from None
    device = sae.W_dec.device
    with torch.no_grad():
        maxes = torch.stack([sae.encode(b.to(device)).amax(0).cpu() for b in x.split(4096)]).amax(0)
    return maxes, f"the first {n} stored rows (no feature table yet)"


def save_feature_vector(run: RunDir, feature_text: str, operation: str) -> SteeringVector:
    """A feature's decoder row as a named vector (`<site>-<index>`) in the run's vectors/."""
    feature = FeatureId.parse(feature_text)
    sae = run.load_sae(feature.site)
    if not 0 <= feature.index < sae.cfg.d_sae:
        raise SteeringError(f"unknown feature {feature}: the SAE at {feature.site} has features 0..{sae.cfg.d_sae - 1}")
    max_act = 1.0
    if operation == "add":
        max_act = float(max_activations(run, str(feature.site), sae)[0][feature.index])
        if max_act <= 0:
            raise SteeringError(f"feature {feature} never fired: there is no max activation to scale it by")
    model = {k: v for k, v in run.open_store().identity.items() if k not in ("data", "context_length")}
    vector = feature_vector(f"{feature.site}-{feature.index}", str(feature), sae.W_dec[feature.index].detach(),
                            max_act, operation, model)
    vector.save(run.vectors)
    return vector
