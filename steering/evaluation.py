"""`make steer-eval`: does a steering target do what it should, as AxBench measures it?

For held-out instruction prompts (steering/prompts/heldout.txt), split by a seeded shuffle:

1. dev split: every (layer, scale) of the sweep is scored by concept presence, instruction relevance
   and fluency, combined by their harmonic mean; the best is chosen there.
2. test split: the chosen setting is reported next to the unsteered model, the prompting
   baseline (the prompt with "Respond tersely." appended, no steering) and a control: a random
   direction of the same norm at the same layer and scale. Means come with 95% bootstrap intervals
   over prompts.

Scores in [0, 1], from an LLM judge (eval.judge, any OpenAI-compatible endpoint, 0-2 ratings
as AxBench) or from measurable proxies:
  concept    length: 1 - mean length / unsteered mean length; keywords: share of answers with one;
             feature: the feature's max activation on the answer, in units of its max activation
  relevance  share of answers more likely after their own prompt than after another prompt
             (under the unsteered model): an answer that ignores its instruction is not
  fluency    unsteered perplexity / perplexity of the answers under the unsteered model, at most 1
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.contrib.concurrent import thread_map
from transformers import DynamicCache

from activations.markdown import table as md_table
from activations.sites import FeatureId
from features.llm import OpenAIChat, ResponseCache
from steering.contrast import build_contrast, read_prompts
from steering.feature_vectors import save_feature_vector
from steering.interventions import SteeringError
from steering.steerer import Steerer, encode_prompt
from steering.vectors import SteeringVector, VectorError

JUDGE_ASPECTS = {
    "concept": "How much does the answer show this concept: {concept}?",
    "relevance": "How well does the answer address the instruction?",
    "fluency": "How fluent and well-formed is the answer's language?",
}


@dataclass
class Outcome:
    name: str
    layer: int | None
    scale: float | None
    lengths: list  # new tokens per answer
    nll: list  # mean negative log-likelihood per answer token, under the unsteered model (nan when empty)
    relevant: list  # 1 when the answer is likelier after its own prompt than after another one
    concept: list  # per answer, in [0, 1] (length: filled in against the unsteered lengths)
    scores: dict  # concept, relevance, fluency, score (harmonic mean)
    texts: list


def run_eval(e: DictConfig, contrast: DictConfig, steerer: Steerer) -> dict:
    """The evaluation an eval config describes (`contrast` builds the target vector when it is missing);
    returns the results, the markdown report among them."""
    prompts = read_prompts(e.prompts)
    random.Random(e.seed).shuffle(prompts)
    if not 0 < e.dev_prompts < len(prompts):
        raise SteeringError(f"eval.dev_prompts={e.dev_prompts} must leave prompts for the test split ({len(prompts)} in all)")
    dev, test = prompts[: e.dev_prompts], prompts[e.dev_prompts:]
    vector, feature = target_vector(e.target, contrast, steerer)
    layers = vector.layers if feature else [int(l) for l in e.layers]
    missing = [l for l in layers if l not in vector.directions]
    if missing:
        raise SteeringError(f"vector {vector.name} has no layer {missing[0]}: set eval.layers among {vector.layers}")
    random_vector(vector, e.seed).save(steerer.run.vectors)
    judge = make_judge(e.judge, steerer.run)
    suffix = e.baseline_suffix or contrast.suffix

    def steer(name, prompt_set, iv_name=None, layer=None, scale=None, append=""):
        ivs = [] if iv_name is None else [{"vector": iv_name, "layers": [layer], "scale": scale, "positions": e.positions}]
        outcome = measure(steerer, e, prompt_set, name, ivs, layer, scale, append, feature)
        print(f"steer eval: {name} on {len(prompt_set)} prompts: mean length {np.mean(outcome.lengths):.1f}", flush=True)
        return outcome

    dev_plain = steer("unsteered", dev)
    sweep = []
    for layer in layers:
        for scale in e.scales:
            sweep.append(steer(f"L{layer} x{scale:g}", dev, vector.name, layer, float(scale)))
    for outcome in [dev_plain, *sweep]:
        score(outcome, dev_plain, dev, e, judge)
    best = max(sweep, key=lambda o: o.scores["score"])

    plain = steer("unsteered", test)
    conditions = [plain, steer(f"prompt baseline (+\"{suffix}\")", test, append=" " + suffix),
                  steer(f"steered {best.name}", test, vector.name, best.layer, best.scale),
                  steer(f"random direction {best.name}", test, f"{vector.name}.random", best.layer, best.scale)]
    for outcome in conditions:
        score(outcome, plain, test, e, judge)
    return summarize(conditions, sweep, best, e, vector, dev, test)


def target_vector(target: str, contrast: DictConfig, steerer: Steerer) -> tuple[SteeringVector, str | None]:
    """(the vector to sweep, the feature ID when the target is a feature)."""
    if "/" in target:
        return save_feature_vector(steerer.run, target, "add"), target
    try:
        return steerer.vector(target), None
    except VectorError:
        if target != contrast.name:
            raise
    print(f"steer eval: building vector {target} from {contrast.prompts} (+\"{contrast.suffix}\")")
    return build_contrast(contrast, steerer), None


def random_vector(vector: SteeringVector, seed: int) -> SteeringVector:
    """A random direction per layer with the norm of the vector's own: the control."""
    generator = torch.Generator().manual_seed(seed)
    directions = {}
    for layer, v in vector.directions.items():
        r = torch.randn(v.shape, generator=generator)
        directions[layer] = r * (v.norm() / r.norm())
    return SteeringVector(f"{vector.name}.random", vector.kind, vector.operation, vector.units, directions,
                          vector.model, {"method": "random", "norm_of": vector.name, "seed": seed})


def measure(steerer: Steerer, e: DictConfig, prompts: list[str], name: str, interventions: list, layer, scale,
            append: str, feature: str | None) -> Outcome:
    """Generate greedily for every prompt, then score the answers under the unsteered model."""
    answers = []
    for i in range(0, len(prompts), e.batch_size):
        batch = [p + append for p in prompts[i: i + e.batch_size]]
        answers += steerer.generate(batch, interventions, max_new_tokens=e.max_new_tokens)
    # Answers are scored after the plain prompts: the baseline's suffix is part of its method, not of the task.
    contexts = [encode_prompt(steerer.tokenizer, p, steerer.chat_default) for p in prompts]
    tokens = [torch.tensor(a.tokens, dtype=torch.long) for a in answers]
    own = answer_logprobs(steerer, contexts, tokens, e.batch_size)
    other = answer_logprobs(steerer, contexts[1:] + contexts[:1], tokens, e.batch_size)
    lengths = [len(t) for t in tokens]
    nll = [-lp / n if n else math.nan for lp, n in zip(own, lengths)]
    relevant = [int(n > 0 and a > b) for a, b, n in zip(own, other, lengths)]
    if e.concept == "keywords":
        concept = [float(any(k.lower() in a.text.lower() for k in e.keywords)) for a in answers]
    elif e.concept == "feature":
        concept = feature_presence(steerer, feature, contexts, tokens)
    else:
        concept = []  # length: relative to the unsteered answers, filled in by score()
    return Outcome(name, layer, scale, lengths, nll, relevant, concept, {}, [a.text for a in answers])


def answer_logprobs(steerer: Steerer, contexts: list, answers: list, batch_size: int) -> list[float]:
    """Sum of log p(answer token | context, earlier answer tokens) per pair."""
    return [logprob for logprob, _ in read_answers(steerer, contexts, answers, batch_size)]


def read_answers(steerer: Steerer, contexts: list, answers: list, batch_size: int, site=None) -> list[tuple]:
    """(sum of the answer's token log-probabilities, the site's rows at the answer's tokens or None)
    per (context, answer) pair, under the unsteered model, in right-padded batches.

    Two savings, as the model is not steered here: the tokens every context of a batch starts with (a chat
    template's system prompt: 24 of SmolLM2's 37) run once, their key-value cache shared by the batch's rows,
    and the LM head runs on the answers' positions only. Together: 0.69x the time of a plain forward for 48
    answers of 32 tokens on SmolLM2 (BENCHMARKS.md, bench-steer)."""
    out = []
    for i in range(0, len(answers), batch_size):
        pairs = list(zip(contexts[i: i + batch_size], answers[i: i + batch_size]))
        longest = max(len(c) + len(a) for c, a in pairs)
        ids = torch.full((len(pairs), longest), steerer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (c, a) in enumerate(pairs):
            ids[row, : len(c) + len(a)], mask[row, : len(c) + len(a)] = torch.cat([c, a]), 1
        # the tokens all contexts start with, but each context's last (its row predicts the answer's first token)
        shared = shared_prefix([c for c, _ in pairs], min(len(c) for c, _ in pairs) - 1)
        captured = {}

        def keep(rows):  # reads only: returns None, so the forward goes on unchanged
            captured["rows"] = rows.float().cpu()

        device = steerer.device
        with torch.inference_mode():
            cache = prefix_cache(steerer, ids[:1, :shared].to(device), len(pairs)) if shared else None
            with steerer.adapter.hooks({site: keep} if site else {}):
                hidden = steerer.model.base_model(
                    input_ids=ids[:, shared:].to(device), attention_mask=mask.to(device), cache=cache,
                    position_ids=torch.arange(shared, longest, device=device).expand(len(pairs), -1),
                    use_cache=cache is not None).last_hidden_state
            # the LM head on the answers' positions only (each predicting the answer's next token)
            picked = torch.cat([hidden[row, len(c) - 1 - shared: len(c) + len(a) - 1 - shared]
                                for row, (c, a) in enumerate(pairs)])
            logprobs = steerer.model.get_output_embeddings()(picked).float().log_softmax(-1).cpu()
        taken = logprobs[torch.arange(len(logprobs)), torch.cat([a for _, a in pairs])]
        for row, ((c, a), answer) in enumerate(zip(pairs, taken.split([len(a) for _, a in pairs]))):
            rows = captured["rows"][row, len(c) - shared: len(c) + len(a) - shared] if site else None
            out.append((float(answer.sum()), rows))
    return out


def shared_prefix(contexts: list[torch.Tensor], most: int) -> int:
    """How many leading tokens all the contexts share, at most `most`."""
    n = 0
    while n < most and all(c[n] == contexts[0][n] for c in contexts[1:]):
        n += 1
    return n


def prefix_cache(steerer: Steerer, prefix: torch.Tensor, rows: int):
    """The key-value cache of one prefix [1, n], repeated for `rows` rows."""
    cache = DynamicCache(config=steerer.model.config)  # the layer kinds the model needs (DeepSeek-V4 compresses)
    steerer.model(input_ids=prefix, cache=cache, use_cache=True)
    cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=prefix.device))  # as in steering/batching.py
    return cache


def feature_presence(steerer: Steerer, feature: str, contexts: list, answers: list) -> list[float]:
    """The feature's max activation over each answer's tokens, in units of its max activation (at most 1)."""
    fid = FeatureId.parse(feature)
    sae, top = steerer.sae(fid.site), steerer.max_act(fid.site, fid.index)
    presence = []
    for c, a in zip(contexts, answers):
        if not len(a):
            presence.append(0.0)
            continue
        rows = steerer.adapter.capture([fid.site], torch.cat([c, a])[None])[fid.site][0, len(c):]
        with torch.inference_mode():
            presence.append(min(1.0, float(sae.encode(rows.float())[:, fid.index].max()) / top))
    return presence


def score(outcome: Outcome, plain: Outcome, prompts: list[str], e: DictConfig, judge) -> None:
    """Fill in outcome.concept (for length) and outcome.scores."""
    if e.concept == "length":
        outcome.concept = [max(0.0, 1 - n / max(1, p)) for n, p in zip(outcome.lengths, plain.lengths)]
    ppl, plain_ppl = perplexity(outcome), perplexity(plain)
    proxies = {"concept": max(0.0, 1 - np.mean(outcome.lengths) / max(1e-9, np.mean(plain.lengths)))
               if e.concept == "length" else float(np.mean(outcome.concept)),
               "relevance": float(np.mean(outcome.relevant)),
               "fluency": min(1.0, plain_ppl / ppl) if math.isfinite(ppl) else 0.0}
    outcome.scores = {**proxies, "perplexity": ppl, "source": "proxies"}
    if judge is not None:
        ratings = judge(prompts, outcome.texts, e.concept_description)
        outcome.scores.update({k: v for k, v in ratings.items()}, source="judge",
                              proxies={k: proxies[k] for k in JUDGE_ASPECTS})
    parts = [outcome.scores[k] for k in JUDGE_ASPECTS]
    outcome.scores["score"] = 0.0 if min(parts) <= 0 else len(parts) / sum(1 / p for p in parts)


def perplexity(outcome: Outcome) -> float:
    """exp of the mean NLL over every answer token of the condition."""
    total = sum(n * l for n, l in zip(outcome.lengths, outcome.nll) if n)
    count = sum(outcome.lengths)
    return math.exp(total / count) if count else math.inf


def make_judge(j: DictConfig, run):
    """ratings(prompts, answers, concept) -> {aspect: mean rating / 2}, or None without an endpoint."""
    if not j.base_url:
        return None
    chat = OpenAIChat(j.base_url, j.model, j.api_key_env, ResponseCache(run.judge_cache),
                      concurrency=j.concurrency)

    def rating(reply: str) -> int | None:
        """The first digit 0-2 of the reply; None when it has none (a weak judge's garbage is no rating)."""
        digits = [c for c in reply if c in "012"]
        return int(digits[0]) if digits else None

    def ratings(prompts, answers, concept):
        asks = [(aspect, p, a) for aspect in JUDGE_ASPECTS for p, a in zip(prompts, answers)]

        def ask(item):
            aspect, prompt, answer = item
            question = JUDGE_ASPECTS[aspect].format(concept=concept)
            content = (f"Instruction: {prompt}\n\nAnswer: {answer}\n\n{question} "
                       "Reply with one digit: 0 (not at all), 1 (somewhat) or 2 (clearly).")
            return rating(chat.ask([{"role": "user", "content": content}], j.max_tokens, str))

        values = thread_map(ask, asks, max_workers=max(1, j.concurrency), desc="judge", unit="ask", dynamic_ncols=True)
        n = len(prompts)
        rated = {aspect: [v for v in values[k * n:(k + 1) * n] if v is not None] for k, aspect in enumerate(JUDGE_ASPECTS)}
        return {aspect: float(np.mean(v)) / 2 if v else math.nan for aspect, v in rated.items()}

    return ratings


def bootstrap(values_fn, n: int, draws: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of values_fn(indices) over `draws` resamples of n prompts."""
    rng = np.random.default_rng(seed)
    stats = [values_fn(rng.integers(0, n, n)) for _ in range(draws)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarize(conditions: list[Outcome], sweep: list[Outcome], best: Outcome, e: DictConfig,
              vector: SteeringVector, dev: list, test: list) -> dict:
    plain, baseline, steered, control = conditions
    base = np.array(plain.lengths, dtype=float)
    rows, table = [], []
    for o in conditions:
        x = np.array(o.lengths, dtype=float)
        ci = bootstrap(lambda i: x[i].mean(), len(x), e.bootstrap, e.seed)
        cut = bootstrap(lambda i: 1 - x[i].mean() / base[i].mean(), len(x), e.bootstrap, e.seed)
        rows.append({"condition": o.name, "mean_length": float(x.mean()), "mean_length_ci95": ci,
                     "reduction_vs_unsteered": float(1 - x.mean() / base.mean()), "reduction_ci95": cut, **o.scores})
        table.append([o.name, f"{x.mean():.1f} [{ci[0]:.1f}, {ci[1]:.1f}]",
                      f"{100 * (1 - x.mean() / base.mean()):.0f}% [{100 * cut[0]:.0f}, {100 * cut[1]:.0f}]",
                      f"{o.scores['concept']:.2f}", f"{o.scores['relevance']:.2f}",
                      f"{o.scores['fluency']:.2f} (ppl {o.scores['perplexity']:.2f})", f"{o.scores['score']:.2f}"])
    s, c = np.array(steered.lengths, float), np.array(control.lengths, float)
    gap = bootstrap(lambda i: c[i].mean() - s[i].mean(), len(s), e.bootstrap, e.seed)
    reduction = 1 - s.mean() / base.mean()
    verdict = {"reduction": float(reduction), "reduction_target_met": bool(reduction >= 0.25),
               "control_minus_steered_ci95": gap, "control_excluded": bool(gap[0] > 0 or gap[1] < 0),
               "beats_prompt_baseline": bool(steered.scores["score"] > baseline.scores["score"])}
    sweep_table = md_table(["dev setting", "mean length", "concept", "relevance", "fluency (ppl)", "score"],
                           [[o.name, f"{np.mean(o.lengths):.1f}", f"{o.scores['concept']:.2f}",
                             f"{o.scores['relevance']:.2f}", f"{o.scores['fluency']:.2f} ({o.scores['perplexity']:.2f})",
                             f"{o.scores['score']:.2f}"] for o in sweep])
    report = "\n".join([
        f"Target `{vector.name}` ({vector.operation} at {vector.kind}), scores from {steered.scores['source']}; "
        f"{len(dev)} dev prompts, {len(test)} test prompts, greedy, at most {e.max_new_tokens} new tokens, "
        f"positions={e.positions}. Chosen on dev: **{best.name}**.", "",
        md_table(["test condition", "mean length [95% CI]", "shorter than unsteered [95% CI]", "concept", "relevance",
                  "fluency", "score"], table), "",
        f"Length cut by the steered setting: **{100 * reduction:.0f}%** (target >= 25%: "
        f"{'met' if verdict['reduction_target_met'] else 'missed'}). Random control minus steered mean length: "
        f"{gap[0]:.1f} to {gap[1]:.1f} tokens (95% CI; the control is "
        f"{'excluded' if verdict['control_excluded'] else 'NOT excluded'}).", "",
        "Dev sweep:", "", sweep_table])
    return {"conditions": rows, "verdict": verdict, "chosen": {"layer": best.layer, "scale": best.scale},
            "sweep": [{"setting": o.name, "layer": o.layer, "scale": o.scale, "mean_length": float(np.mean(o.lengths)),
                       **o.scores} for o in sweep],
            "examples": [{"prompt": p, **{o.name: o.texts[k] for o in conditions}} for k, p in enumerate(test[:3])],
            "report": report}


def save_eval(run, results: dict) -> None:
    """results.json and report.md of `make steer-eval` in the run's steer_eval/."""
    run.steer_eval.mkdir(parents=True, exist_ok=True)
    run.steer_eval_results.write_text(json.dumps(results, indent=2) + "\n")
    run.steer_eval_report.write_text(results["report"] + "\n")
