"""SAE architectures: sae-lens's training classes, built from a Dialbox SAEConfig.

sae-lens owns the parameters, the losses and the file format; Dialbox only chooses the
class and its settings here (and, for TopK, runs a faster step in sae/step.py, which also
trains matryoshka_topk: sae-lens's TopK SAE under Matryoshka's nested losses).
"""

from __future__ import annotations

import math

import sae_lens
from sae_lens.saes.sae import SAEMetadata, TrainingSAE

from activations.errors import ConfigError

# Dialbox name -> sae-lens training architecture
ARCHITECTURES = {
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "relu_l1": "standard",
    "matryoshka": "matryoshka_batchtopk",
    "matryoshka_topk": "topk",  # a plain TopK SAE; only its training loss is nested (sae/step.py)
}


def sae_width(cfg, d_in: int) -> int:
    return int(cfg.d_sae) if cfg.d_sae > 0 else int(cfg.expansion_factor) * d_in


def learning_rate(cfg, d_sae: int) -> float:
    """Wider dictionaries want smaller steps (sparsify's rule, scaled up for short runs)."""
    return float(cfg.lr) if cfg.lr > 0 else 8e-4 / math.sqrt(d_sae / 16384)


TOPK_FAMILY = ("topk", "batchtopk", "matryoshka", "matryoshka_topk")


def decoder_init_norm(cfg) -> float:
    """Unit decoder rows for the TopK family, sae-lens's 0.1 for the others, unless set.

    Adam moves every weight by about lr per step whatever its gradient, so at 0.1 the first
    steps change each encoder column by a quarter of its norm (lr 1e-3 x sqrt(576) / 0.1): the
    latents that happen to win early outgrow the rest and take every token, and in the demo's
    200 steps 65% of the latents died (at step 20 15% were dead, at step 50 57%, in a run where
    AuxK kicks in at step 19 and could not revive them). At norm 1 the same steps are 2.6%
    of each column: no latent died and FVU came out no worse. A TopK SAE's selection is by rank, so
    the scale costs it nothing; ReLU-L1 and JumpReLU weigh activations against a penalty and a
    threshold tuned for 0.1, so they keep it.
    """
    if cfg.decoder_init_norm > 0:
        return float(cfg.decoder_init_norm)
    return 1.0 if cfg.architecture in TOPK_FAMILY else 0.1


def _architecture_fields(cfg, d_sae: int) -> dict:
    arch = cfg.architecture
    if arch in TOPK_FAMILY:
        fields = {"k": int(cfg.k), "aux_loss_coefficient": float(cfg.aux_loss_coefficient)}
        if arch == "matryoshka":
            fields["matryoshka_widths"] = list(nested_widths(cfg, d_sae))
        return fields
    if arch == "jumprelu":
        return {"l0_coefficient": float(cfg.l0_coefficient), "jumprelu_init_threshold": float(cfg.jumprelu_init_threshold),
                "jumprelu_bandwidth": float(cfg.jumprelu_bandwidth)}
    return {"l1_coefficient": float(cfg.l1_coefficient)}


def nested_widths(cfg, d_sae: int) -> tuple[int, ...]:
    """The Matryoshka levels: each prefix of the dictionary reconstructs on its own; () for the others."""
    if cfg.architecture not in ("matryoshka", "matryoshka_topk"):
        return ()
    widths = [int(w) for w in cfg.matryoshka_widths] or [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    if widths[-1] != d_sae or sorted(set(widths)) != widths or widths[0] <= 0:
        raise ConfigError(f"sae.matryoshka_widths={widths} must increase and end at d_sae={d_sae}")
    return tuple(widths)


def inner_levels(cfg, d_sae: int) -> tuple[tuple[int, float], ...]:
    """matryoshka_topk's inner levels for the fast step: (width, weight of that prefix's reconstruction loss),
    the weight sae.matryoshka_balance ** (levels below the whole dictionary); () for the other architectures."""
    if cfg.architecture != "matryoshka_topk":
        return ()
    widths = nested_widths(cfg, d_sae)[:-1]
    balance = float(cfg.matryoshka_balance)
    if balance < 0:
        raise ConfigError(f"sae.matryoshka_balance={balance} must be >= 0 (1: Matryoshka's plain sum of losses)")
    return tuple((width, balance ** (len(widths) - i)) for i, width in enumerate(widths))


def build_sae(cfg, d_in: int, metadata: dict, device: str = "cpu") -> TrainingSAE:
    """A freshly initialised sae-lens training SAE for `cfg` on `d_in`-wide activations."""
    if cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown sae.architecture {cfg.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    d_sae = sae_width(cfg, d_in)
    if cfg.architecture in TOPK_FAMILY and not 0 < cfg.k <= d_sae:
        raise ConfigError(f"sae.k={cfg.k} must be between 1 and d_sae={d_sae}")
    sae_class, config_class = sae_lens.registry.get_sae_training_class(ARCHITECTURES[cfg.architecture])
    config = config_class(
        d_in=d_in, d_sae=d_sae, dtype="float32", device=device, decoder_init_norm=decoder_init_norm(cfg),
        metadata=SAEMetadata(**metadata), **_architecture_fields(cfg, d_sae),
    )
    return sae_class(config)
