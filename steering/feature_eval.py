"""`make steer-features`: which features steer, with which op and scale, and how strongly.

For each feature of a seeded sample of live labelled features (plus any IDs given):

1. dev prompts (neutral requests that name no concept): every (op, scale) of the sweep generates
   greedily. Each answer is scored by
     concept  the share of its tokens on which the feature fires, read through the feature's SAE
              in the unsteered model over prompt + answer;
     fluency  unsteered perplexity / the answers' perplexity under the unsteered model (at most 1),
              times the share of 4-grams that do not repeat: a degenerate loop is not fluent.
   The setting with the best harmonic mean of the two is chosen, as AxBench chooses a factor, among
   the settings within the perplexity and repeat limits below (all of them when none is).
2. test prompts: the chosen setting is reported next to the unsteered model, a random live
   feature at the same setting (the control), and the prompt baseline, the bar to beat (the prompt
   plus "Mention <label> in your answer.", or "Use the words ..." for a token-list label).

A feature steers when the 95% bootstrap interval (over test prompts) of its concept gain over the
control excludes 0, its perplexity is at most `max_ppl_ratio` times the unsteered one and at most
`max_repeats` of its answers' 4-grams repeat (a loop reads as likely to the model). `steers` is derived
again from the stored scores on every run, so a changed limit applies to features already evaluated.

Each finished feature is one JSON line in features/<site>/steering.jsonl, so a killed run resumes
and a rerun evaluates only the features not done; the steer_* columns of features.parquet are
rewritten from that file at the end.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from activations.markdown import table as md_table
from activations.sites import FeatureId, Site
from features.tables import append_steering_result, read_steering_results, set_feature_columns
from steering.batching import Row, generate_rows
from steering.contrast import read_prompts
from steering.evaluation import bootstrap, make_judge, read_answers
from steering.interventions import SteeringError
from steering.steerer import Steerer, encode_prompt

COLUMNS = {"steer_op": "string", "steer_scale": "float32", "steer_units": "string", "steer_concept": "float32",
           "steer_fluency": "float32", "steer_score": "float32", "steers": "bool", "steer_prompts": "int32"}


@dataclass(frozen=True)
class Setting:
    op: str
    scale: float
    units: str

    def intervention(self, feature: str) -> dict:
        return {"feature": feature, "op": self.op, "scale": self.scale, "units": self.units}

    def __str__(self) -> str:
        return f"{self.op} {self.scale:g} ({self.units})"


@dataclass
class Answers:
    """Greedy answers to a prompt set under one condition, read back by the unsteered model."""

    texts: list[str]
    fires: np.ndarray  # [prompts, watched features]: share of answer tokens where each feature fires
    nll: np.ndarray  # [prompts]: mean negative log-likelihood per answer token (nan when empty)
    tokens: np.ndarray  # [prompts]: answer lengths
    repeats: np.ndarray  # [prompts]: share of the answer's 4-grams that repeat an earlier one

    def perplexity(self) -> float:
        ok = self.tokens > 0
        return float(np.exp((self.nll[ok] * self.tokens[ok]).sum() / self.tokens[ok].sum())) if ok.any() else math.inf


class FeatureEvaluation:
    """The steering evaluation of some features of one site (see the module docstring)."""

    def __init__(self, steerer: Steerer, site: Site, features: list[int], cfg: DictConfig):
        self.steerer, self.site, self.cfg = steerer, site, cfg
        self.sae = steerer.sae(site)
        self.watch = features  # every feature whose firing is read from every answer
        prompts = read_prompts(cfg.prompts)
        random.Random(cfg.seed).shuffle(prompts)
        if cfg.dev_prompts + cfg.test_prompts > len(prompts):
            raise SteeringError(f"steer_features needs {cfg.dev_prompts} dev + {cfg.test_prompts} test prompts; "
                                f"{cfg.prompts} holds {len(prompts)}")
        self.dev, self.test = prompts[: cfg.dev_prompts], prompts[cfg.dev_prompts: cfg.dev_prompts + cfg.test_prompts]
        self.settings = [Setting("add", float(s), "norm") for s in cfg.add_scales]
        self.settings += [Setting("clamp", float(s), "max_act") for s in cfg.clamp_scales]
        self._cache: dict[tuple, Answers] = {}
        self.judge = make_judge(cfg.judge, steerer.run)  # None without an endpoint

    def answers(self, conditions: list[tuple]) -> list[Answers]:
        """Greedy answers for each condition (prompts, interventions, suffix), all generated as rows of
        shared batches, then read after their plain prompts (the suffix is the baseline's method, not part
        of the task) with the watched features' SAE activations."""
        rows = [Row(encode_prompt(self.steerer.tokenizer, p + suffix, self.steerer.chat_default),
                    self.steerer.hooks(interventions), max_new_tokens=self.cfg.max_new_tokens)
                for prompts, interventions, suffix in conditions for p in prompts]
        generated = iter(generate_rows(self.steerer, rows, self.cfg.batch_size))
        return [self.read(prompts, [next(generated) for _ in prompts]) for prompts, _, _ in conditions]

    def read(self, prompts: list[str], generated: list) -> Answers:
        """The generations' scores: where the watched features fire, their likelihood and repeats."""
        contexts = [encode_prompt(self.steerer.tokenizer, p, self.steerer.chat_default) for p in prompts]
        tokens = [torch.tensor(g.tokens, dtype=torch.long) for g in generated]
        read = read_answers(self.steerer, contexts, tokens, self.cfg.batch_size, site=self.site)
        fires = np.zeros((len(prompts), len(self.watch)))
        for k, (_, rows) in enumerate(read):
            if len(rows):
                with torch.inference_mode():
                    acts = self.sae.encode(rows.to(self.steerer.device))[:, self.watch]
                fires[k] = (acts > 0).float().mean(0).cpu().numpy()
        lengths = np.array([len(t) for t in tokens])
        nll = np.array([-lp / n if n else math.nan for (lp, _), n in zip(read, lengths)])
        return Answers([g.text for g in generated], fires, nll, lengths, np.array([repeat_share(t) for t in tokens]))

    def shared(self, key: tuple, prompts: list[str], interventions: list) -> Answers:
        """Answers that do not depend on the feature evaluated (unsteered, random control): made once."""
        if key not in self._cache:
            self._cache[key] = self.answers([(prompts, interventions, "")])[0]
        return self._cache[key]

    def scores(self, answers: Answers, plain: Answers, column: int) -> dict:
        concept = float(answers.fires[:, column].mean())
        fluency = min(1.0, plain.perplexity() / answers.perplexity()) * (1 - float(answers.repeats.mean()))
        return {"concept": concept, "fluency": fluency, "score": harmonic(concept, fluency),
                "perplexity": answers.perplexity(), "repeats": float(answers.repeats.mean())}

    def evaluate(self, index: int, label: str, control: int) -> dict:
        """One feature: the dev sweep, then the test report against its controls."""
        feature, column = f"{self.site}/{index}", self.watch.index(index)
        plain_dev = self.shared(("plain", "dev"), self.dev, [])
        swept = self.answers([(self.dev, [s.intervention(feature)], "") for s in self.settings])
        sweep = [(s, self.scores(answers, plain_dev, column)) for s, answers in zip(self.settings, swept)]
        best, dev_scores = choose_setting(sweep, self.cfg.max_ppl_ratio * plain_dev.perplexity(), self.cfg.max_repeats)
        plain = self.shared(("plain", "test"), self.test, [])
        steered, baseline = self.answers([(self.test, [best.intervention(feature)], ""),
                                          (self.test, [], " " + baseline_instruction(label))])
        control_id = f"{self.site}/{control}"
        random_control = self.shared(("control", best, control), self.test, [best.intervention(control_id)])
        draws, seed = self.cfg.bootstrap, self.cfg.seed
        gain = steered.fires[:, column] - plain.fires[:, column]
        over_control = steered.fires[:, column] - random_control.fires[:, column]
        over_baseline = steered.fires[:, column] - baseline.fires[:, column]
        scores = self.scores(steered, plain, column)
        ppl_ratio = scores["perplexity"] / plain.perplexity()
        interval = bootstrap(lambda i: over_control[i].mean(), len(over_control), draws, seed)
        return {
            "feature": feature, "index": index, "label": label, "op": best.op, "scale": best.scale,
            "units": best.units, "dev": {"setting": str(best), **dev_scores,
                                         "sweep": [{"setting": str(s), **sc} for s, sc in sweep]},
            "concept": scores["concept"], "fluency": scores["fluency"], "score": scores["score"],
            "perplexity": scores["perplexity"], "perplexity_ratio": ppl_ratio, "repeats": scores["repeats"],
            "unsteered": self.scores(plain, plain, column), "control_feature": control_id,
            "control": self.scores(random_control, plain, column), "baseline": self.scores(baseline, plain, column),
            "baseline_instruction": baseline_instruction(label),
            "gain": float(gain.mean()), "gain_ci95": bootstrap(lambda i: gain[i].mean(), len(gain), draws, seed),
            "gain_over_control": float(over_control.mean()), "gain_over_control_ci95": interval,
            "gain_over_baseline": float(over_baseline.mean()),
            "gain_over_baseline_ci95": bootstrap(lambda i: over_baseline[i].mean(), len(over_baseline), draws, seed),
            "prompts": len(self.test),
            "examples": [{"prompt": self.test[k], "unsteered": plain.texts[k], "steered": steered.texts[k]}
                         for k in range(min(2, len(self.test)))],
            # AxBench's 0-2 ratings (concept, relevance, fluency) scaled to [0, 1], when a judge is configured
            "judge": {name: self.judge(self.test, answers.texts, label or feature)
                      for name, answers in (("steered", steered), ("baseline", baseline))} if self.judge else None,
        }


def choose_setting(sweep: list[tuple], max_perplexity: float, max_repeats: float) -> tuple:
    """The (setting, scores) of the sweep with the best harmonic mean, among those within the perplexity
    and repeat limits (all of them when none is). Only such a setting can count as steering; unconstrained,
    the concept share (a few hundredths) dominates the mean and the strongest push wins, then fails a limit."""
    within = [item for item in sweep if item[1]["perplexity"] <= max_perplexity and item[1]["repeats"] <= max_repeats]
    return max(within or sweep, key=lambda item: item[1]["score"])


def steers(result: dict, cfg: DictConfig) -> bool:
    """Whether an evaluated feature steers: its gain over the random control excludes 0 within the limits."""
    return bool(result["gain_over_control_ci95"][0] > 0 and result["perplexity_ratio"] <= cfg.max_ppl_ratio
                and result["repeats"] <= cfg.max_repeats)


def harmonic(a: float, b: float) -> float:
    return 0.0 if min(a, b) <= 0 else 2 / (1 / a + 1 / b)


def repeat_share(tokens: torch.Tensor, n: int = 4) -> float:
    """The share of an answer's n-grams that already occurred earlier in it ("in for in for ..." is near 1)."""
    grams = [tuple(tokens[i: i + n].tolist()) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def baseline_instruction(label: str) -> str:
    """The prompt baseline's instruction: the label itself, or its words for a token-list label."""
    if label.startswith("tokens "):  # heuristic labels: tokens "fore", "' '", "aned" (often "Wherefore")
        peaks, _, often = label.partition(" (often ")
        quoted = re.findall(r'"([^"]+)"', often) + re.findall(r'"([^"]+)"', peaks)  # the whole word first
        words = list(dict.fromkeys(w.strip() for w in quoted if any(c.isalpha() for c in w)))
        if words:
            return f"Use the words {', '.join(words[:3])} in your answer."
    return f"Mention {label} in your answer."


def choose_features(table: dict, n: int, given: list[int], seed: int) -> list[int]:
    """The given features, then a seeded sample of `n` live labelled ones."""
    live = [i for i, dead, label in zip(table["index"], table["dead"], table["label"]) if not dead and label]
    sample = random.Random(seed).sample(sorted(live), min(n, len(live)))
    return list(dict.fromkeys([*given, *sample]))


def check_features(table: dict, indices: list[int], site: str) -> None:
    known = dict(zip(table["index"], table["dead"]))
    for i in indices:
        if i not in known:
            raise SteeringError(f"unknown feature {site}/{i}: the SAE at {site} has features 0..{len(known) - 1}")
        if known[i]:
            raise SteeringError(f"feature {site}/{i} is dead (it never fired while labelling): it cannot be "
                                "steered by its max activation; pick a live one")


def controls(table: dict, watch: list[int], seed: int) -> dict[int, int]:
    """A random live feature for each evaluated one, outside the evaluated set where possible."""
    rng = random.Random(seed + 1)
    live = [i for i, dead in zip(table["index"], table["dead"]) if not dead]
    pool = [i for i in live if i not in set(watch)] or live
    control = rng.choice(pool)
    return {i: control if control != i else rng.choice([j for j in live if j != i] or [i]) for i in watch}


def evaluate_features(steerer: Steerer, cfg: DictConfig) -> dict:
    """Evaluate the features cfg asks for (resuming from steering.jsonl) and update features.parquet."""
    run = steerer.run
    site = Site.parse(cfg.site) if cfg.site else Site.parse(first_labelled_site(run))
    steerer.sae(site)  # no SAE there: say so before anything else
    table = run.feature_table(str(site), ["index", "dead", "label"])
    if table is None:
        raise SteeringError(f"no feature table at {site}: run `make label` first (it gives labels and max activations)")
    given = [parse_at(f, site) for f in cfg.features]
    check_features(table, given, str(site))
    watch = choose_features(table, cfg.n, given, cfg.seed)
    site_dir = run.features(str(site))
    done = read_steering_results(site_dir)
    todo = [i for i in watch if i not in done]
    labels = dict(zip(table["index"], table["label"]))
    evaluation = FeatureEvaluation(steerer, site, watch, cfg)
    pairs = controls(table, watch, cfg.seed)
    for index in tqdm(todo, desc=f"steer features {site}", unit="feature", dynamic_ncols=True):
        result = evaluation.evaluate(index, labels[index] or "", pairs[index])
        result["steers"] = steers(result, cfg)
        append_steering_result(site_dir, result)
        done[index] = result
    for result in done.values():  # derived again: a changed limit applies to the features evaluated before
        result["steers"] = steers(result, cfg)
    results = [done[i] for i in watch]
    set_feature_columns(site_dir, feature_columns(list(done.values())), COLUMNS)
    return {"site": str(site), "results": results, "evaluated_now": len(todo)}


def first_labelled_site(run) -> str:
    sites = [s for s in run.trained_sites() if run.feature_table_path(s).exists()]
    if not sites:
        raise SteeringError(f"no labelled SAE in {run.root}: run `make label` first")
    return sites[0]


def parse_at(text, site: Site) -> int:
    """A feature ID at the evaluated site, or a bare index."""
    if str(text).isdigit():
        return int(text)
    feature = FeatureId.parse(text)
    if feature.site != site:
        raise SteeringError(f"feature {feature} is not at the evaluated site {site}: set steer_features.site")
    return feature.index


def feature_columns(results: list[dict]) -> dict[str, dict[int, object]]:
    """The steer_* columns of features.parquet, by feature index."""
    pick = {"steer_op": "op", "steer_scale": "scale", "steer_units": "units", "steer_concept": "concept",
            "steer_fluency": "fluency", "steer_score": "score", "steers": "steers", "steer_prompts": "prompts"}
    return {column: {r["index"]: r[key] for r in results} for column, key in pick.items()}


def summary(results: list[dict], output_scores: dict[int, float] | None = None, max_ppl_ratio: float = 2.0) -> dict:
    """What the benchmark reports: the share that steers, add against clamp, the gain over the prompt
    baseline, the fluency cost, and how well the output score predicts `steers`."""
    n = len(results)
    steers = [r for r in results if r["steers"]]
    ops = {op: [r for r in results if r["op"] == op] for op in ("add", "clamp")}
    by_score = sorted(results, key=lambda r: r["score"], reverse=True)
    top = by_score[: max(1, n // 10)]
    out = {
        "features": n, "steer_share": len(steers) / n if n else 0.0,
        "by_op": {op: {"chosen": len(rs), "steer": sum(r["steers"] for r in rs)} for op, rs in ops.items()},
        "mean_gain": float(np.mean([r["gain"] for r in results])) if n else 0.0,
        "mean_gain_over_baseline": float(np.mean([r["gain_over_baseline"] for r in results])) if n else 0.0,
        "top_decile_beats_baseline": sum(r["gain_over_baseline"] >= 0 and r["perplexity_ratio"] <= max_ppl_ratio
                                         for r in top),
        "top_decile": len(top),
        "median_perplexity_ratio": float(np.median([r["perplexity_ratio"] for r in results])) if n else 0.0,
    }
    scored = [r for r in results if (output_scores or {}).get(r["index"]) is not None]  # none with output_score=false
    if scored:
        out["output_score_auroc"] = auroc([output_scores[r["index"]] for r in scored], [r["steers"] for r in scored])
    return out


def output_scores(run, site: str) -> dict[int, float]:
    """{feature: its output score} where `make label` computed one."""
    table = run.feature_table(site, ["index", "output_score"]) or {}
    return {int(i): s for i, s in zip(table.get("index", []), table.get("output_score", [])) if s is not None}


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """The chance that a feature that steers has a higher score than one that does not (ties half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def features_report(results: list[dict], s: dict, f: DictConfig) -> str:
    """A markdown summary: the headline numbers, then one row per feature."""
    rows = [[r["feature"], (r["label"] or "")[:40].replace("|", "/"), f"{r['op']} {r['scale']:g} {r['units']}",
             f"{r['gain']:+.3f} [{r['gain_ci95'][0]:+.3f}, {r['gain_ci95'][1]:+.3f}]",
             f"{r['gain_over_control']:+.3f} [{r['gain_over_control_ci95'][0]:+.3f}, {r['gain_over_control_ci95'][1]:+.3f}]",
             f"{r['gain_over_baseline']:+.3f}", f"{r['perplexity_ratio']:.2f}", f"{r['repeats']:.2f}",
             "yes" if r["steers"] else "no"] for r in sorted(results, key=lambda r: -r["score"])]
    output_auroc = s.get("output_score_auroc")
    lines = [
        f"{s['features']} features at their site, {f.dev_prompts} dev / {f.test_prompts} test neutral prompts, greedy, "
        f"{f.max_new_tokens} new tokens; sweep add {list(f.add_scales)} (x mean row norm), clamp "
        f"{list(f.clamp_scales)} (x max activation). Concept = share of answer tokens on which the feature fires.", "",
        f"- **steer: {s['steer_share']:.0%}** of the features (gain over a random live feature at the same setting "
        f"excludes 0, perplexity <= {f.max_ppl_ratio:g}x unsteered, repeated 4-grams <= {f.max_repeats:g})",
        f"- chosen op: add {s['by_op']['add']['chosen']} (steer {s['by_op']['add']['steer']}), clamp "
        f"{s['by_op']['clamp']['chosen']} (steer {s['by_op']['clamp']['steer']})",
        f"- mean concept gain over unsteered {s['mean_gain']:+.3f}; over the prompt baseline "
        f"{s['mean_gain_over_baseline']:+.3f}; top decile by steering score matching or beating the prompt "
        f"baseline within the perplexity limit: {s['top_decile_beats_baseline']} of {s['top_decile']}",
        f"- median perplexity ratio (fluency cost) {s['median_perplexity_ratio']:.2f}",
        "- output score (make label) as a predictor of `steers`: AUROC "
        + (f"{output_auroc:.2f}" if output_auroc is not None else "n/a (no output scores, or one class only)"), "",
        md_table(["feature", "label", "chosen (dev)", "concept gain [95% CI]", "gain over random feature [95% CI]",
               "gain over prompt baseline", "ppl ratio", "repeated 4-grams", "steers"], rows),
    ]
    return "\n".join(lines)
