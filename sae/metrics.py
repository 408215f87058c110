"""How good an SAE is: the metrics of metrics.json.

- fvu: squared reconstruction error over the total variance around the mean, on the tokens training
  used (outlier-norm tokens left out); fvu_all_tokens: the same on every row the store would hold,
  outliers included, which is what recomputing FVU over all stored rows gives;
- l0: active latents per token; dense_frac: latents active on more than 10% of tokens;
- ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) and kl_div(clean || sae),
  measured by splicing the reconstruction into the model's forward at the site. It means something
  only inside [0, 1] and when zeroing the site costs the model something: otherwise (a model near
  chance, such as a random one) `ce_loss_recovered_note` says so, and the train stage prints it.

Splicing uses the adapter's hooks (activations/adapters.py) and touches only the rows the
store would hold (special tokens such as BOS keep their own activations, as in training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return ((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def _replace_kept(keep: torch.Tensor, fn):
    """A hook body that replaces the kept rows of [batch, seq, width] with fn(those rows)."""
    def hook(rows):
        rows = rows.clone()
        rows[keep] = fn(rows[keep].float()).to(rows.dtype)
        return rows
    return hook


@torch.no_grad()
def spliced_metrics(adapter, site, sae, batches: list[tuple[torch.Tensor, torch.Tensor]], ce: bool = True,
                    max_norm: float = 0.0) -> dict:
    """Metrics of a (folded, raw-space) sae-lens SAE on held-out windows.

    `batches` holds (input_ids [b, L], keep [b, L] bool) pairs; with ce=False only the
    reconstruction metrics are computed (no forward past the site). With max_norm > 0, tokens
    whose activation norm exceeds it are treated like special tokens (as training left them out).
    """
    xs, recons, acts_l0, fire_counts = [], [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    inliers = []
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0, "tokens": 0}
    device = next(adapter.model.parameters()).device
    model = adapter.model
    for ids, keep in batches:
        ids, stored = ids.to(device), keep.to(device)
        if ce:  # the clean forward, which CE needs anyway, also yields the site's rows
            seen = []
            with adapter.hooks({site: lambda r: seen.append(r.clone())}):
                clean = model(ids).logits
            rows = seen[0]
        else:  # only the rows: the forward stops at the site
            rows = adapter.capture([site], ids)[site]
        keep = stored & (rows.float().norm(dim=-1) <= max_norm) if max_norm > 0 else stored
        # Every stored row is reconstructed (for fvu_all_tokens); the other metrics and the splice use the kept ones.
        x = rows[stored].float()
        feats = sae.encode(x.to(sae.W_dec.device))
        recon = sae.decode(feats).float()
        inlier = keep[stored].cpu()
        xs.append(x.cpu())
        recons.append(recon.cpu())
        inliers.append(inlier)
        feats, recon = feats[inlier.to(feats.device)], recon[inlier.to(recon.device)]
        active = (feats > 0).cpu()
        acts_l0.append(active.sum(-1).float())
        fire_counts += active.sum(0)
        if not ce:
            continue
        # Upstream of the site nothing changes, so the spliced rows are the reconstruction just made.
        with adapter.hooks({site: _replace_kept(keep, lambda _: recon)}):
            spliced = model(ids).logits
        with adapter.hooks({site: _replace_kept(keep, torch.zeros_like)}):
            zero = model(ids).logits
        totals["clean"] += _next_token_ce(clean, ids).item()
        totals["sae"] += _next_token_ce(spliced, ids).item()
        totals["zero"] += _next_token_ce(zero, ids).item()
        log_p, log_q = F.log_softmax(clean.float(), -1), F.log_softmax(spliced.float(), -1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(clean || sae) per position
        totals["kl"] += kl[:, :-1].sum().item()
        totals["tokens"] += ids[:, 1:].numel()

    x, recon, inlier = torch.cat(xs), torch.cat(recons), torch.cat(inliers)
    n = int(inlier.sum())
    metrics = {"fvu": fvu(x[inlier], recon[inlier]), "fvu_all_tokens": fvu(x, recon), "l0": torch.cat(acts_l0).mean().item(),
               "dense_frac": (fire_counts.float() / n > 0.1).float().mean().item(), "eval_tokens": n}
    if ce and totals["tokens"]:
        t = totals["tokens"]
        clean, spliced, zero = totals["clean"] / t, totals["sae"] / t, totals["zero"] / t
        metrics.update(ce_loss_clean=clean, ce_loss_with_sae=spliced, ce_loss_zero_ablation=zero,
                       ce_loss_recovered=(zero - spliced) / (zero - clean), kl_div=totals["kl"] / t)
        if note := ce_recovered_note(metrics):
            metrics["ce_loss_recovered_note"] = note
    return metrics


def ce_recovered_note(m: dict) -> str | None:
    """Why ce_loss_recovered does not apply, or None when it does: it must be a fraction, of a gap between
    zero ablation and clean CE of at least 1% of the clean CE (the tiny random DeepSeek-V4's is 0.1%,
    SmolLM2's at L15 over 300%); a smaller gap makes the ratio noise, whatever it happens to be."""
    outside = not 0 <= m["ce_loss_recovered"] <= 1
    if not outside and m["ce_loss_zero_ablation"] - m["ce_loss_clean"] >= 0.01 * m["ce_loss_clean"]:
        return None
    why = "is outside [0, 1]" if outside else "is a ratio of noise"
    return (f"ce_loss_recovered {m['ce_loss_recovered']:.3g} {why}, so it does not apply here: zeroing the site "
            f"moves CE only from {m['ce_loss_clean']:.4g} to {m['ce_loss_zero_ablation']:.4g} nats while the SAE "
            f"gives {m['ce_loss_with_sae']:.4g} (a model near chance, or a site the output barely depends on); read "
            "fvu and kl_div instead")
