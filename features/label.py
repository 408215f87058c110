"""Labelling: a run's trained SAEs, site by site (`label`); one site is mined, then per feature
examples -> label -> scores, then the tables (`label_site`).

Features are handled in chunks, so the examples of 65,536 features never sit in memory at once.
A feature the LLM could not label (endpoint down, garbage replies) is written as `unlabelled`
with the reason; the LLM's good replies are cached, so a rerun only asks again for those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm
from tqdm.contrib.concurrent import thread_map

from activations.config import ModelConfig
from activations.errors import ConfigError
from activations.adapters import ModelAdapter, make_adapter
from activations.models import load_model, load_tokenizer, resolve_device
from activations.rundir import LabelFiles, RunDir
from activations.sites import Site, SiteError
from activations.store import ActivationStore, StoreError
from features import explain, score
from features.examples import ExamplePlan, attach_tokens, feature_examples
from features.experts import counted_layers, expert_columns, expert_table, write_experts
from features.lens import decoder_neighbours, logit_lens
from features.llm import ChatModel, LLMError, LocalChat, OpenAIChat, ResponseCache
from features.mining import HIST_EDGES, FeatureMiner, MiningPlan
from features.output_score import output_scores
from features.tables import ExampleWriter, merge_parts, write_features, write_meta

if TYPE_CHECKING:
    from sae_lens import SAE  # slow to import, and the label stage loads it through RunDir anyway

CHUNK = 1024  # features per chunk of examples


@dataclass
class SiteInputs:
    site: str
    sae: SAE
    store: ActivationStore
    model: nn.Module  # for the logit lens (only its final norm and unembedding are used)
    vocab: list[str]  # token id -> decoded string
    adapter: ModelAdapter | None = None  # the whole model's adapter, for output scores (None: not scored)
    contexts: torch.Tensor | None = None  # [c, T] token ids the output score is measured on


@dataclass
class FeatureSlice:
    """The features [lo, hi) one label job covers, and the directory its tables go to."""
    lo: int
    hi: int
    out: Path

    @property
    def features(self) -> range:
        return range(self.lo, self.hi)


@dataclass
class DecoderFacts:
    """What the decoder rows of a slice say on their own, without the corpus."""
    lens: tuple | None  # logit_lens(): (pos values, pos ids, neg values, neg ids), None for a width it cannot read
    neighbours: torch.Tensor  # [n, k] nearest features by decoder cosine
    neighbour_cos: torch.Tensor
    outputs: torch.Tensor | None  # output scores (None: not scored)


def mining_plan(cfg, expert_layers: list[int] = ()) -> MiningPlan:
    return MiningPlan(context_tokens=cfg.context_tokens, top_examples=cfg.top_examples,
                      sampled_examples=cfg.sampled_examples, pool_blocks=cfg.pool_blocks,
                      batch_blocks=max(1, cfg.batch_tokens // cfg.context_tokens), max_tokens=cfg.max_tokens,
                      outlier_norm=cfg.outlier_norm, seed=cfg.seed, expert_layers=tuple(expert_layers))


def label_site(inputs: SiteInputs, cfg, explainer, chat: ChatModel | None, site_dir: Path, device) -> tuple[Path, dict]:
    """Write site_dir/{features,examples}.parquet and meta.json; return where, and label sources counted.

    cfg: the `label` config; explainer: the `explainer` config; chat: its model (None = heuristic).
    With `label.features=[start, stop)` the slice goes to site_dir/parts/<start>-<stop>/, and the
    job that completes the cover of all features merges the parts into site_dir.
    """
    part = feature_slice(cfg.features, inputs.sae.cfg.d_sae, inputs.site, site_dir)
    layers = counted_layers(inputs.store.router, Site.parse(inputs.site).layer, cfg.expert_layers)
    plan = mining_plan(cfg, layers)
    miner = FeatureMiner(inputs.store, inputs.site, inputs.sae, plan, device, (part.lo, part.hi))
    state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in
             miner.run(LabelFiles(part.out).mining, cfg.checkpoint_seconds).items()}
    decoder = decoder_facts(inputs, cfg, part, state["fires"] > 0)
    token_ids = inputs.store.tokens(0, miner.n_blocks * plan.context_tokens)["tokens"]
    use_llm = _llm_features(state["fires"], part.lo, chat, explainer.max_features, cfg.seed)
    described = describe_features(inputs, state, part, decoder, token_ids, chat, use_llm, explainer.max_tokens, cfg)
    columns = feature_columns(inputs, state, part, described, decoder)
    write_features(part.out, columns | expert_columns(state, layers, cfg.top_experts))
    if layers:
        write_experts(part.out, expert_table(state, layers, part.lo, cfg.expert_features))
    write_meta(part.out, site_meta(inputs, state, part, plan, chat, len(use_llm), layers, cfg))
    if part.out != site_dir and merge_parts(site_dir):
        print(f"label: {inputs.site}: every slice is done; merged {site_dir / 'parts'} into {site_dir}")
    sources = columns["label_source"]
    return part.out, {src: sources.count(src) for src in sorted(set(sources))}


def feature_slice(features: list, n: int, site: str, site_dir: Path) -> FeatureSlice:
    """label.features ([] for all n) as a slice, its directory made: site_dir, or its part of it."""
    lo, hi = (features or [0, n])[:2]
    if not 0 <= lo < hi <= n:
        raise ConfigError(f"label.features={list(features)} is not a range [start, stop) within the {n} features "
                          f"of {site}")
    out = site_dir if (lo, hi) == (0, n) else LabelFiles(site_dir).part(lo, hi).dir
    out.mkdir(parents=True, exist_ok=True)
    return FeatureSlice(lo, hi, out)


def decoder_facts(inputs: SiteInputs, cfg, part: FeatureSlice, live: torch.Tensor) -> DecoderFacts:
    w_dec = inputs.sae.W_dec.detach()
    rows = w_dec[part.lo:part.hi]
    lens = logit_lens(rows, inputs.model, cfg.logit_tokens)
    neighbour_cos, neighbours = decoder_neighbours(w_dec, cfg.neighbours, rows=(part.lo, part.hi))
    outputs = None
    if inputs.adapter is not None and lens is not None:
        outputs = output_scores(inputs.adapter, inputs.site, rows, lens[1], inputs.contexts,
                                inputs.store.stats(inputs.site)["mean_norm"], live, cfg.output_strength, first=part.lo)
    return DecoderFacts(lens, neighbours, neighbour_cos, outputs)


def describe_features(inputs: SiteInputs, state: dict, part: FeatureSlice, decoder: DecoderFacts, token_ids,
                      chat: ChatModel | None, use_llm: set, max_tokens: int, cfg) -> dict[int, dict]:
    """Every feature's examples written and its label and scores made ({feature: _describe()}; the LLM labels
    those in use_llm, token counts the rest), a chunk of features at a time so that the examples of 65,536
    features never sit in memory at once."""
    context_tokens = cfg.context_tokens
    eplan = ExamplePlan(cfg.quantiles, cfg.explain_top, cfg.explain_per_quantile, cfg.random_examples, cfg.seed)
    writer = ExampleWriter(part.out, context_tokens)
    described = {}
    for start in tqdm(range(part.lo, part.hi, CHUNK), desc=f"label {inputs.site}", unit="chunk", dynamic_ncols=True):
        chunk = range(start, min(start + CHUNK, part.hi))
        examples = {f: feature_examples(state, f, eplan, context_tokens) for f in chunk}
        for exs in examples.values():
            attach_tokens(exs, token_ids, inputs.vocab, context_tokens)

        def describe(f):
            promoted = [inputs.vocab[i] for i in decoder.lens[1][f - part.lo].tolist()] if decoder.lens else []
            dead = bool(state["fires"][f - part.lo] == 0)
            return _describe(examples[f], promoted, dead, chat if f in use_llm else None, max_tokens, cfg)

        llm_chunk = [f for f in chunk if f in use_llm]
        if llm_chunk:
            described.update(zip(llm_chunk, thread_map(describe, llm_chunk, max_workers=max(1, chat.concurrency),
                                                       desc="explain", unit="feat", dynamic_ncols=True)))
        described.update({f: describe(f) for f in chunk if f not in use_llm})
        writer.write(examples)
    writer.close()
    return described


def site_meta(inputs: SiteInputs, state: dict, part: FeatureSlice, plan: MiningPlan, chat, n_llm: int,
              layers: list[int], cfg) -> dict:
    return {
        "site": inputs.site, "n_features": inputs.sae.cfg.d_sae, "features": [part.lo, part.hi],
        "tokens_mined": int(state["tokens"]), "hist_edges": HIST_EDGES.tolist(), "context_tokens": plan.context_tokens,
        "explainer": f"llm:{chat.name}" if chat else "heuristic",
        "llm_features": n_llm,
        "scorer": "detection and fuzzing (balanced accuracy) on examples the explainer did not see",
        "model": inputs.sae.cfg.metadata.model_name, "sae": f"saes/{inputs.site}",
        "expert_layers": layers, "expert_features": cfg.expert_features,
        "n_experts": {layer: inputs.store.router[layer]["n_experts"] for layer in layers},
    }


def _llm_features(fires: torch.Tensor, lo: int, chat, limit: int, seed: int) -> set:
    """The live features the LLM labels: all of them, or a seeded sample of explainer.max_features."""
    if chat is None:
        return set()
    live = (torch.nonzero(fires > 0).flatten() + lo).tolist()
    if limit and limit < len(live):
        live = np.random.default_rng(seed).choice(live, limit, replace=False).tolist()
    return set(live)


def _describe(examples, promoted, dead: bool, chat, max_tokens: int, cfg) -> dict:
    """label, label_source, label_error, detection, fuzzing and top tokens of one feature."""
    top_tokens = explain.peak_tokens(examples)
    result = dict(label=None, label_source="dead" if dead else "unlabelled", label_error=None,
                  detection=None, fuzzing=None, top_tokens=top_tokens)
    if dead:
        return result
    try:
        if chat is not None:
            label, judge, source = explain.llm_label(chat, examples, promoted, max_tokens), score.LLMJudge(chat), f"llm:{chat.name}"
        else:
            label, judge, source = explain.heuristic_label(examples), score.TokenJudge(), "heuristic"
    except LLMError as e:
        return {**result, "label_error": f"explainer: {e}"}
    result.update(label=label, label_source=source)
    try:
        result["detection"] = score.detection(judge, label, examples, cfg.score_examples)
        result["fuzzing"] = score.fuzzing(judge, label, examples, cfg.score_examples, cfg.seed)
    except LLMError as e:
        result["label_error"] = f"scorer: {e}"
    return result


def feature_columns(inputs: SiteInputs, state: dict, part: FeatureSlice, described: dict, decoder: DecoderFacts) -> dict:
    """The columns of features.parquet for the slice (expert columns aside)."""
    fires, tokens = state["fires"], max(int(state["tokens"]), 1)
    rows = [described[f] for f in part.features]
    scores = [[r[k] for k in ("detection", "fuzzing") if r[k] is not None] for r in rows]
    if decoder.lens:
        pos_vals, pos_ids, neg_vals, neg_ids = (t.tolist() for t in decoder.lens)
        pos, neg = ([[inputs.vocab[i] for i in row] for row in ids] for ids in (pos_ids, neg_ids))
    else:  # no logit lens for this site's width
        pos_vals = pos = neg_vals = neg = [[] for _ in rows]
    outputs = decoder.outputs.tolist() if decoder.outputs is not None else [None] * len(rows)
    return {
        "index": list(part.features), "feature_id": [f"{inputs.site}/{f}" for f in part.features],
        "density": (fires.double() / tokens).tolist(), "max_act": state["top_keys"][:, 0].clamp(min=0).tolist(),
        "mean_act": (state["act_sum"] / fires.clamp(min=1)).tolist(), "dead": (fires == 0).tolist(),
        **{k: [r[k] for r in rows] for k in ("label", "label_source", "label_error", "detection", "fuzzing", "top_tokens")},
        "score": [sum(s) / len(s) if s else None for s in scores],
        "logit_pos": pos, "logit_pos_values": pos_vals, "logit_neg": neg, "logit_neg_values": neg_vals,
        "neighbours": decoder.neighbours.tolist(), "neighbour_cos": decoder.neighbour_cos.tolist(),
        "hist_counts": state["hist"].tolist(),
        "output_score": [None if v is None or v != v else float(v) for v in outputs],  # NaN: not scored
    }


# --- a whole run -----------------------------------------------------------------------------


def trained_sites(run: RunDir, wanted: list) -> list[str]:
    found = run.trained_sites()
    if not found:
        raise StoreError(f"no trained SAEs in {run.saes()}: run `make train` first")
    missing = [s for s in wanted if s not in found]
    if missing:
        raise SiteError(f"no trained SAE for {', '.join(missing)} in {run.saes()}: it has {', '.join(found)}")
    return list(wanted) or found


def make_chat(explainer: DictConfig, run: RunDir, model_cfg: DictConfig):
    """The explainer's chat model (None for heuristic labels); replies cached in the run directory."""
    cache = ResponseCache(run.llm_cache)
    if explainer.kind == "heuristic":
        return None
    if explainer.kind == "openai":
        return OpenAIChat(explainer.base_url, explainer.model, explainer.api_key_env, cache, explainer.concurrency,
                          explainer.retries, explainer.backoff_s, explainer.timeout_s)
    cfg = model_cfg  # explainer.kind is local
    if explainer.local_path:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": explainer.local_path, "source": "hub",
                                                                   "path": explainer.local_path, "device": model_cfg.device})
    model, tokenizer = load_model(cfg)
    return LocalChat(model, tokenizer, cfg.name, cache, retries=0)  # greedy: a retry would repeat the reply


def label(cfg: DictConfig) -> dict:
    run = RunDir.from_config(cfg)
    store = run.open_store()
    sites = trained_sites(run, list(cfg.label.sites))
    model_cfg = run.model_config()
    device = resolve_device(cfg.label.device, "label.device")
    chat = make_chat(cfg.explainer, run, model_cfg)
    # The logit lens needs the final norm and the unembedding only, so without output scores the first
    # block alone is loaded, unless the local explainer has already loaded the whole model.
    own = isinstance(chat, LocalChat) and not cfg.explainer.local_path
    lens_model = chat.model if own else load_model(model_cfg, max_layer=None if cfg.label.output_score else 0)[0]
    adapter = make_adapter(lens_model, model_cfg) if cfg.label.output_score else None
    tokenizer = load_tokenizer(model_cfg)
    vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    contexts = output_contexts(store, tokenizer, cfg.label) if adapter else None
    run.save_config(cfg, "label")
    results = {}
    for site in sites:
        sae = run.load_sae(site, device)
        if sae.cfg.d_in != store.width(site):
            raise StoreError(f"the SAE at {run.saes(site)} reads width {sae.cfg.d_in} but the store's {site} has "
                             f"width {store.width(site)}: retrain it on this store")
        inputs = SiteInputs(site, sae, store, lens_model, vocab, adapter, contexts)
        out, results[site] = label_site(inputs, cfg.label, cfg.explainer, chat, run.features(site), device)
        print(f"label: {site}: " + ", ".join(f"{n} {src}" for src, n in results[site].items()) + f" in {out}")
    return results


def output_contexts(store, tokenizer, cfg) -> torch.Tensor:
    """[label.output_contexts, label.output_context_tokens] token ids: stretches of the stored corpus
    spread over the store, each after a BOS as the harvest's windows were."""
    n, length = cfg.output_contexts, cfg.output_context_tokens
    stride = max(length, store.n_tokens // max(n, 1))
    starts = [k * stride for k in range(n) if k * stride + length <= store.n_tokens]
    if not starts:
        raise StoreError(f"the store holds {store.n_tokens} tokens, too few for an output-score context of {length}: "
                         "lower label.output_context_tokens or set label.output_score=false")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return torch.tensor([bos + store.tokens(s, s + length)["tokens"].tolist() for s in starts], dtype=torch.long)
