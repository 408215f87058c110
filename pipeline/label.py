"""`make label` / `python -m pipeline.label`: every feature of every trained SAE mined, labelled
and scored into runs/<run>/features/<site>/ (features.parquet, examples.parquet, meta.json).

The explainer is a config group: `explainer=heuristic` (default, no LLM), `explainer=local`
(a transformers model here; the run's own model unless explainer.local_path says otherwise) or
`explainer=openai explainer.base_url=... explainer.model=...` (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from sae_lens import SAE

from features.label import SiteInputs, label_site
from features.llm import LLMError, LocalChat, OpenAIChat, ResponseCache
from features.tables import read_features
from pipeline.config import ModelConfig, register_configs
from pipeline.corpus import CorpusError
from pipeline.models import load_model, load_tokenizer, resolve_device
from pipeline.rundir import RunDir, one_line_errors
from pipeline.sites import SiteError
from pipeline.store import StoreError
from pipeline.train import harvested_model

register_configs()


def trained_sites(run: RunDir, wanted: list) -> list[str]:
    found = sorted(p.parent.name for p in run.saes().glob("*/cfg.json"))
    if not found:
        raise StoreError(f"no trained SAEs in {run.saes()}: run `make train` first")
    missing = [s for s in wanted if s not in found]
    if missing:
        raise SiteError(f"no trained SAE for {', '.join(missing)} in {run.saes()}: it has {', '.join(found)}")
    return list(wanted) or found


def make_chat(explainer: DictConfig, run: RunDir, model_cfg: DictConfig):
    """The explainer's chat model (None for heuristic labels); replies cached in the run directory."""
    cache = ResponseCache(run.root / "features" / "llm-cache.jsonl")
    if explainer.kind == "heuristic":
        return None
    if explainer.kind == "openai":
        return OpenAIChat(explainer.base_url, explainer.model, explainer.api_key_env, cache, explainer.concurrency,
                          explainer.retries, explainer.backoff_s, explainer.timeout_s)
    if explainer.kind == "local":
        cfg = model_cfg
        if explainer.local_path:
            cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": explainer.local_path, "source": "hub",
                                                                       "path": explainer.local_path, "device": model_cfg.device})
        model, tokenizer = load_model(cfg)
        return LocalChat(model, tokenizer, cfg.name, cache, retries=0)  # greedy: a retry would repeat the reply
    raise ValueError(f"unknown explainer.kind {explainer.kind!r}: use heuristic, local or openai")


def label(cfg: DictConfig) -> dict:
    run = RunDir.from_config(cfg)
    store = run.open_store()
    sites = trained_sites(run, list(cfg.label.sites))
    model_cfg = harvested_model(run)
    device = resolve_device(cfg.label.device)
    chat = make_chat(cfg.explainer, run, model_cfg)
    # The logit lens needs the final norm and the unembedding only: load the first block alone,
    # unless the local explainer has already loaded the whole model.
    lens_model = chat.model if isinstance(chat, LocalChat) and not cfg.explainer.local_path else load_model(model_cfg, max_layer=0)[0]
    tokenizer = load_tokenizer(model_cfg)
    vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    run.save_config(cfg, "label")
    results = {}
    for site in sites:
        sae = SAE.load_from_disk(run.saes(site), device=str(device))
        if sae.cfg.d_in != store.width(site):
            raise StoreError(f"the SAE at {run.saes(site)} reads width {sae.cfg.d_in} but the store's {site} has "
                             f"width {store.width(site)}: retrain it on this store")
        inputs = SiteInputs(site, sae, store, lens_model, vocab)
        out, results[site] = label_site(inputs, cfg.label, cfg.explainer, chat, run.root / "features" / site, device)
        print(f"label: {site}: " + ", ".join(f"{n} {src}" for src, n in results[site].items()) + f" in {out}")
        show_best(out)
    return results


def show_best(out, n: int = 5) -> None:
    """Print a few labelled features: LLM labels first, best scores first."""
    table = read_features(out).to_pandas()
    table = table[table.label.notna()].assign(llm=lambda t: t.label_source.str.startswith("llm"))
    for row in table.sort_values(["llm", "score"], ascending=False).head(n).itertuples():
        score = "unscored" if row.score != row.score else f"score {row.score:.2f}"
        print(f"  {row.feature_id:<24} {row.label}  ({row.label_source}, {score}, density {row.density:.2%})")


@hydra.main(config_path="../conf", config_name="label", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    with one_line_errors("label", SiteError, StoreError, CorpusError, LLMError, ValueError):
        label(cfg)


if __name__ == "__main__":
    main()
