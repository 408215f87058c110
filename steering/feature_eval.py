"""`make steer-features`: which features steer, with which dial, and how visibly.

For each feature of a seeded sample of live labelled features (plus the ones make label's predictor ranks
highest, plus any IDs given), two dials (docs/guide.md, "Which features steer, and their dials"):

  decoder  the SAE's decoder row, add or clamp, at the setting of a sweep; added at every position or on
           the request's positions only (the model then writes its answer unsteered, as if asked)
  tuned    a vector trained on the model's own dev answers that carry the concept (steering/dials.py),
           acting where it was trained to act (tune.positions: the request's positions by default)

1. dev prompts (neutral requests that name no concept): every setting of each dial generates greedily.
   Each answer is read through the feature's SAE in the unsteered model over prompt + answer: the concept
   is *present* when the feature fires on one of its tokens at `presence` x its max activation or more.
   The setting with the best harmonic mean of the feature's mean peak (presence's graded form) and
   fluency (unsteered perplexity / the answers' perplexity, at most 1, times the share of 4-grams that
   do not repeat) is chosen, as AxBench chooses a factor, among the settings within the perplexity and
   repeat limits (all of them when none is).
2. test prompts: each dial's chosen setting is reported next to the unsteered model, a random live
   feature pushed as hard (the control), and the prompt baseline, the bar to beat (the prompt plus
   "Mention <label> in your answer.", or "Use the words ..." for a token-list label).

A dial steers visibly when the share of test answers with the concept rises by `min_presence_gain` over
unsteered and over the control, the gain's 95% bootstrap interval (over test prompts) excludes 0, its
perplexity is at most `max_ppl_ratio` times the unsteered one and at most `max_repeats` of its answers'
4-grams repeat (a loop reads as likely to the model). The per-token share of the concept is kept as a
second measure. `steers` and the best dial are derived again from the stored numbers on every run, so a
changed limit applies to features already evaluated.

Each finished feature is one JSON line in features/<site>/steering.jsonl, so a killed run resumes
and a rerun evaluates only the features not done; the steer_* columns of features.parquet are
rewritten from that file at the end.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from activations.markdown import table as md_table
from activations.sites import FeatureId, Site
from features.tables import append_steering_result, read_steering_results, set_feature_columns
from steering.batching import Row, generate_rows
from steering.contrast import read_prompts
from steering.dials import Pair, tune_dial
from steering.evaluation import bootstrap, make_judge, read_answers
from steering.interventions import SteeringError
from steering.steerer import Steerer, encode_prompt, tuned_dial_name
from steering.vectors import SteeringVector

COLUMNS = {"steer_op": "string", "steer_scale": "float32", "steer_units": "string", "steer_positions": "string",
           "steer_dial": "string",
           "steer_presence": "float32", "steer_gain": "float32", "steer_concept": "float32", "steer_fluency": "float32",
           "steer_score": "float32", "steers": "bool", "steer_prompts": "int32"}
# make label's cheap predictors of whether a feature steers (columns of features.parquet): the output score, and
# the share of corpus tokens the feature fires on (docs/guide.md, "Knowing before paying": both, and others tried)
PREDICTORS = ("output_score", "density")


@dataclass(frozen=True)
class Setting:
    op: str
    scale: float
    units: str
    positions: str = "all"

    def intervention(self, feature: str) -> dict:
        return {"feature": feature, "op": self.op, "scale": self.scale, "units": self.units, "positions": self.positions}

    def __str__(self) -> str:
        return f"{self.op} {self.scale:g} ({self.units}{where(self.positions)})"


@dataclass
class Answers:
    """Greedy (or sampled) answers to a prompt set under one condition, read back by the unsteered model."""

    texts: list[str]
    ids: list[torch.Tensor]  # each answer's token ids
    acts: list[np.ndarray]  # each answer's [tokens, watched features] activations / each feature's max activation
    nll: np.ndarray  # [prompts]: mean negative log-likelihood per answer token (nan when empty)
    tokens: np.ndarray  # [prompts]: answer lengths
    repeats: np.ndarray  # [prompts]: share of the answer's 4-grams that repeat an earlier one

    @cached_property
    def fires(self) -> np.ndarray:
        """[prompts, watched features]: the share of answer tokens on which each feature fires."""
        return np.stack([(a > 0).mean(0) if len(a) else np.zeros(a.shape[1]) for a in self.acts])

    @cached_property
    def peaks(self) -> np.ndarray:
        """[prompts, watched features]: each feature's top activation on the answer / its max activation."""
        return np.stack([a.max(0) if len(a) else np.zeros(a.shape[1]) for a in self.acts])

    def perplexity(self) -> float:
        ok = self.tokens > 0
        return float(np.exp((self.nll[ok] * self.tokens[ok]).sum() / self.tokens[ok].sum())) if ok.any() else math.inf


@dataclass
class Dial:
    """One way to steer a feature, as chosen on the dev prompts: its interventions and what they scored."""

    name: str  # decoder | tuned
    interventions: list
    setting: str
    dev: dict  # the chosen setting's dev scores, and the whole sweep
    control: list  # a random live feature pushed as hard: the control at the same setting
    info: dict = field(default_factory=dict)  # the decoder's op/scale/units, the tuned dial's vector and training


class FeatureEvaluation:
    """The steering evaluation of some features of one site (see the module docstring)."""

    def __init__(self, steerer: Steerer, site: Site, features: list[int], cfg: DictConfig):
        self.steerer, self.site, self.cfg = steerer, site, cfg
        self.sae = steerer.sae(site)
        self.watch = features  # every feature whose firing is read from every answer
        self.max_acts = torch.tensor([steerer.max_act(site, i) for i in features])
        prompts = read_prompts(cfg.prompts)
        random.Random(cfg.seed).shuffle(prompts)
        if cfg.dev_prompts + cfg.test_prompts > len(prompts):
            raise SteeringError(f"steer_features needs {cfg.dev_prompts} dev + {cfg.test_prompts} test prompts; "
                                f"{cfg.prompts} holds {len(prompts)}")
        self.dev, self.test = prompts[: cfg.dev_prompts], prompts[cfg.dev_prompts: cfg.dev_prompts + cfg.test_prompts]
        self.settings = [Setting("add", float(s), "norm") for s in cfg.add_scales]
        self.settings += [Setting("clamp", float(s), "max_act") for s in cfg.clamp_scales]
        self.settings += [Setting("add", float(s), "norm", "prompt") for s in cfg.prompt_scales]
        self._cache: dict[tuple, Answers] = {}
        self.judge = make_judge(cfg.judge, steerer.run)  # None without an endpoint

    def answers(self, conditions: list[tuple], temperature: float = 0.0, seed: int = 0) -> list[Answers]:
        """Answers for each condition (prompts, interventions, suffix), all generated as rows of shared
        batches (greedy, or sampled with a seed per row), then read after their plain prompts (the suffix
        is the baseline's method, not part of the task) with the watched features' SAE activations."""
        rows = [Row(encode_prompt(self.steerer.tokenizer, p + suffix, self.steerer.chat_default),
                    self.steerer.hooks(interventions), max_new_tokens=self.cfg.max_new_tokens,
                    temperature=temperature, seed=seed + k)
                for prompts, interventions, suffix in conditions for k, p in enumerate(prompts)]
        generated = iter(generate_rows(self.steerer, rows, self.cfg.batch_size))
        return [self.read(prompts, [next(generated) for _ in prompts]) for prompts, _, _ in conditions]

    def read(self, prompts: list[str], generated: list) -> Answers:
        """The generations' scores: where the watched features fire, how strongly, their likelihood and repeats."""
        contexts = [encode_prompt(self.steerer.tokenizer, p, self.steerer.chat_default) for p in prompts]
        tokens = [torch.tensor(g.tokens, dtype=torch.long) for g in generated]
        read = read_answers(self.steerer, contexts, tokens, self.cfg.batch_size, site=self.site)
        acts = []
        for _, rows in read:
            with torch.inference_mode():
                acts.append((self.sae.encode(rows.to(self.steerer.device))[:, self.watch].float().cpu()
                             / self.max_acts).numpy())
        lengths = np.array([len(t) for t in tokens])
        nll = np.array([-lp / n if n else math.nan for (lp, _), n in zip(read, lengths)])
        return Answers([g.text for g in generated], tokens, acts, nll, lengths,
                       np.array([repeat_share(t) for t in tokens]))

    def shared(self, key: tuple, prompts: list[str], interventions: list) -> Answers:
        """Answers that do not depend on the feature evaluated (unsteered, random control): made once."""
        if key not in self._cache:
            self._cache[key] = self.answers([(prompts, interventions, "")])[0]
        return self._cache[key]

    def present(self, answers: Answers, column: int) -> np.ndarray:
        """[prompts] 1 where the concept is present in the answer: the feature fires on one of its tokens
        at `presence` x its max activation or more."""
        return (answers.peaks[:, column] >= self.cfg.presence).astype(float)

    def scores(self, answers: Answers, plain: Answers, column: int) -> dict:
        """presence (share of answers with the concept), concept (share of answer tokens on which the feature
        fires), fluency, and the sweep's score: the harmonic mean of fluency and the mean peak (presence's
        graded form: 8 dev prompts give presence in steps of 1/8, ties the sweep could not break)."""
        fluency = min(1.0, plain.perplexity() / answers.perplexity()) * (1 - float(answers.repeats.mean()))
        peak = float(np.clip(answers.peaks[:, column], 0, 1).mean())
        return {"presence": float(self.present(answers, column).mean()), "concept": float(answers.fires[:, column].mean()),
                "fluency": fluency, "score": harmonic(peak, fluency), "perplexity": answers.perplexity(),
                "repeats": float(answers.repeats.mean())}

    def sweep(self, candidates: list[tuple[str, list]], column: int) -> tuple[int, dict, list[Answers]]:
        """The best of the candidates (setting text, interventions) on the dev prompts: its position, its dev
        scores with the whole sweep's, and every candidate's answers."""
        plain_dev = self.shared(("plain", "dev"), self.dev, [])
        swept = self.answers([(self.dev, interventions, "") for _, interventions in candidates])
        scored = [(k, self.scores(answers, plain_dev, column)) for k, answers in enumerate(swept)]
        k, dev = choose_setting(scored, self.cfg.max_ppl_ratio * plain_dev.perplexity(), self.cfg.max_repeats)
        return k, {"setting": candidates[k][0], **dev, "sweep": [{"setting": candidates[j][0], **sc} for j, sc in scored]}, swept

    def decoder_dial(self, feature: str, column: int, control: str) -> tuple[Dial, list[Answers]]:
        """The decoder row added or clamped, at the setting of the sweep the dev prompts choose."""
        k, dev, swept = self.sweep([(str(s), [s.intervention(feature)]) for s in self.settings], column)
        s = self.settings[k]
        info = {"op": s.op, "scale": s.scale, "units": s.units, "positions": s.positions}
        return Dial("decoder", [s.intervention(feature)], str(s), dev, [s.intervention(control)], info), swept

    def tuned_dial(self, index: int, column: int, label: str, decoder: Dial, swept: list[Answers],
                   control: str) -> Dial | None:
        """A vector trained on dev answers in which the concept is present (steering/dials.py), swept over
        multiples of itself; None when no fluent dev answer had the concept, so there was nothing to learn from."""
        t, started = self.cfg.tune, time.monotonic()
        positions = str(t.positions)
        baseline = (self.dev, [], " " + baseline_instruction(label))
        candidates = [*swept, *self.answers([baseline])]
        for s in range(t.samples):  # sampled answers: more chances of the concept, and variety
            candidates += self.answers([(self.dev, decoder.interventions, ""), baseline], temperature=t.temperature,
                                       seed=self.cfg.seed + 1000 * (s + 1))
        pairs = self.pairs(candidates, column)[: t.max_pairs]
        if not pairs:
            return None
        vector, losses = tune_dial(self.steerer, self.site, self.start_vector(index), pairs, t)
        feature = FeatureId(self.site, index)
        name = tuned_dial_name(feature)
        source = {"method": "tuned", "features": [str(feature)], "objective": "RePS-style preference + NLL + KL",
                  "data": f"{len(pairs)} pairs from {len(self.dev)} dev prompts (seed {self.cfg.seed})",
                  "steps": t.steps, "lr": t.lr, "beta": t.beta, "nll": t.nll, "kl": t.kl, "start": "decoder row",
                  "losses": [round(x, 4) for x in losses]}
        save_dial(self.steerer, name, self.site, vector, {**source, "multiplier": 1.0}, positions)
        k, dev, _ = self.sweep([(f"tuned x{m:g}{where(positions)}", [{"vector": name, "scale": float(m)}])
                                for m in t.scales], column)
        m = float(t.scales[k])
        save_dial(self.steerer, name, self.site, vector * m, {**source, "multiplier": m}, positions)  # scale 1: as chosen
        norm_ratio = float(vector.norm()) * m / self.steerer.mean_norm(self.site)
        control_push = [{"feature": control, "op": "add", "scale": norm_ratio, "units": "norm", "positions": positions}]
        info = {"vector": name, "pairs": len(pairs), "steps": t.steps, "multiplier": m, "norm_ratio": norm_ratio,
                "positions": positions, "train_seconds": round(time.monotonic() - started, 1)}
        return Dial("tuned", [{"vector": name}], dev["setting"], dev, control_push, info)

    def pairs(self, candidates: list[Answers], column: int) -> list[Pair]:
        """Preference pairs from dev answers: each distinct answer with the concept that stays fluent (perplexity
        within the limit, few repeats) against the unsteered answer to the same prompt, spread over the prompts."""
        plain = self.shared(("plain", "dev"), self.dev, [])
        limit = math.log(self.cfg.max_ppl_ratio * plain.perplexity())
        by_prompt: list[dict] = [{} for _ in self.dev]
        for answers in candidates:
            good = (self.present(answers, column) > 0) & (answers.nll <= limit) & (answers.repeats <= self.cfg.max_repeats)
            for k in np.flatnonzero(good):
                by_prompt[k].setdefault(tuple(answers.ids[k].tolist()), answers.ids[k])
        contexts = [encode_prompt(self.steerer.tokenizer, p, self.steerer.chat_default) for p in self.dev]
        found = [list(d.values()) for d in by_prompt]
        order = [(k, found[k][depth]) for depth in range(max(map(len, found), default=0))
                 for k in range(len(found)) if depth < len(found[k])]
        return [Pair(contexts[k], answer, plain.ids[k]) for k, answer in order if len(plain.ids[k])]

    def start_vector(self, index: int) -> torch.Tensor:
        """The decoder row at the sweep's middle add strength: where the tuned dial starts."""
        row = self.sae.W_dec[index].detach().float().cpu()
        scales = sorted(self.cfg.add_scales) or [0.25]
        return row / row.norm().clamp_min(1e-12) * scales[len(scales) // 2] * self.steerer.mean_norm(self.site)

    def evaluate(self, index: int, label: str, control: int) -> dict:
        """One feature: each dial's dev sweep, then the test report against the controls and the prompt baseline."""
        feature, column, control_id = f"{self.site}/{index}", self.watch.index(index), f"{self.site}/{control}"
        decoder, swept = self.decoder_dial(feature, column, control_id)
        dials = [decoder]
        if self.cfg.tune.steps > 0:
            tuned = self.tuned_dial(index, column, label, decoder, swept, control_id)
            dials += [tuned] if tuned else []
        plain = self.shared(("plain", "test"), self.test, [])
        *steered, baseline = self.answers([*[(self.test, d.interventions, "") for d in dials],
                                           (self.test, [], " " + baseline_instruction(label))])
        reports = {d.name: self.dial_report(d, answers, plain, baseline, column) for d, answers in zip(dials, steered)}
        result = {"feature": feature, "index": index, "label": label, "control_feature": control_id,
                  "presence_threshold": self.cfg.presence, **decoder.info, **reports["decoder"],
                  "tuned": reports.get("tuned"), "tuned_reason": None if "tuned" in reports or self.cfg.tune.steps == 0
                  else "no dev answer had the concept: nothing to train on",
                  "unsteered": self.scores(plain, plain, column), "baseline": self.scores(baseline, plain, column),
                  "baseline_instruction": baseline_instruction(label), "prompts": len(self.test),
                  # AxBench's 0-2 ratings (concept, relevance, fluency) scaled to [0, 1], when a judge is configured
                  "judge": {name: self.judge(self.test, answers.texts, label or feature)
                            for name, answers in [*zip(reports, steered), ("baseline", baseline)]}
                  if self.judge else None}
        return result

    def dial_report(self, dial: Dial, steered: Answers, plain: Answers, baseline: Answers, column: int) -> dict:
        """A dial's test numbers: presence and per-token gains over unsteered, the random control at the same
        setting and the prompt baseline, with 95% intervals, fluency, and two sample answers."""
        control = self.shared(("control", dial.name, dial.setting, str(dial.control)), self.test, dial.control)
        draws, seed = self.cfg.bootstrap, self.cfg.seed
        ci = lambda x: bootstrap(lambda i: x[i].mean(), len(x), draws, seed)  # noqa: E731
        present = self.present(steered, column)
        presence_gain = present - self.present(plain, column)
        presence_over_control = present - self.present(control, column)
        gain = steered.fires[:, column] - plain.fires[:, column]
        over_control = steered.fires[:, column] - control.fires[:, column]
        scores = self.scores(steered, plain, column)
        report = {
            "dial": dial.name, "setting": dial.setting, "dev": dial.dev, **dial.info, **scores,
            "perplexity_ratio": scores["perplexity"] / plain.perplexity(),
            "presence_gain": float(presence_gain.mean()), "presence_gain_ci95": ci(presence_gain),
            "presence_over_control": float(presence_over_control.mean()),
            "presence_over_baseline": float((present - self.present(baseline, column)).mean()),
            "gain": float(gain.mean()), "gain_ci95": ci(gain),
            "gain_over_control": float(over_control.mean()), "gain_over_control_ci95": ci(over_control),
            "gain_over_baseline": float((steered.fires[:, column] - baseline.fires[:, column]).mean()),
            "control": self.scores(control, plain, column),
            "examples": [{"prompt": self.test[k], "unsteered": plain.texts[k], "steered": steered.texts[k],
                          "baseline": baseline.texts[k]} for k in range(min(2, len(self.test)))],
        }
        return report  # judge_dials adds within_limits and visibly


def choose_setting(sweep: list[tuple], max_perplexity: float, max_repeats: float) -> tuple:
    """The (setting, scores) of the sweep with the best harmonic mean, among those within the perplexity
    and repeat limits (all of them when none is). Only such a setting can count as steering; unconstrained,
    the concept share (a few hundredths) dominates the mean and the strongest push wins, then fails a limit."""
    within = [item for item in sweep if item[1]["perplexity"] <= max_perplexity and item[1]["repeats"] <= max_repeats]
    return max(within or sweep, key=lambda item: item[1]["score"])


def within_limits(report: dict, cfg: DictConfig) -> bool:
    """The dial's answers stay readable: perplexity at most max_ppl_ratio x unsteered, few repeated 4-grams."""
    return bool(report["perplexity_ratio"] <= cfg.max_ppl_ratio and report["repeats"] <= cfg.max_repeats)


def steers_visibly(report: dict, cfg: DictConfig) -> bool:
    """A dial steers visibly when the share of test answers with the concept rises by min_presence_gain over
    unsteered and over the random control at the same setting, the gain's 95% interval excludes 0, and the
    answers stay within the perplexity and repeat limits."""
    return bool(report["presence_gain"] >= cfg.min_presence_gain and report["presence_over_control"] >= cfg.min_presence_gain
                and report["presence_gain_ci95"][0] > 0 and within_limits(report, cfg))


def judge_dials(result: dict, cfg: DictConfig) -> dict:
    """steers (any dial visibly) and the best dial (decoder or tuned), derived again from the stored numbers: a
    changed limit applies to features evaluated before (a changed presence threshold needs a new evaluation)."""
    reports = [r for r in (result, result.get("tuned")) if r]
    for r in reports:
        r["within_limits"], r["visibly"] = within_limits(r, cfg), steers_visibly(r, cfg)
    best = max(reports, key=lambda r: (r["visibly"], r["presence_gain"] if r["within_limits"] else -1))
    result["dial"], result["steers"] = best["dial"], any(r["visibly"] for r in reports)
    result["criteria"] = {"presence": result.get("presence_threshold", cfg.presence),
                          **{k: cfg[k] for k in ("min_presence_gain", "max_ppl_ratio", "max_repeats")}}
    return result


def save_dial(steerer: Steerer, name: str, site: Site, vector: torch.Tensor, source: dict,
              positions: str) -> SteeringVector:
    """A dial as a named `add` vector in the run's vectors/ (raw units: scale 1 is the dial as chosen), acting
    where it was tuned to act unless an intervention says otherwise."""
    dial = SteeringVector(name, site.kind, "add", "raw", {site.layer: vector.float().cpu()}, steerer.identity, source,
                          positions)
    dial.save(steerer.run.vectors)
    return dial


def where(positions: str) -> str:
    """How a setting's text names where it acts: nothing for every position."""
    return "" if positions == "all" else f", {positions} only"


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


def sample_features(table: dict, n: int, seed: int) -> list[int]:
    """A seeded sample of `n` live labelled features."""
    live = [i for i, dead, label in zip(table["index"], table["dead"], table["label"]) if not dead and label]
    return random.Random(seed).sample(sorted(live), min(n, len(live)))


def top_features(run, site: str, n: int, predictor: str) -> list[int]:
    """The `n` live labelled features that `make label`'s predictor of steering ranks highest."""
    if n <= 0:
        return []
    table = run.feature_table(site, ["index", "dead", "label", predictor]) or {}
    if predictor not in table:
        raise SteeringError(f"features.parquet at {site} has no {predictor} column: run `make label` with "
                            f"label.output_score=true, or set steer_features.top=0")
    ranked = sorted((-score, i) for i, dead, label, score in zip(table["index"], table["dead"], table["label"],
                                                                 table[predictor])
                    if not dead and label and score is not None and math.isfinite(score))
    return [i for _, i in ranked[:n]]


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
    top, sample = top_features(run, str(site), cfg.top, cfg.predictor), sample_features(table, cfg.n, cfg.seed)
    watch = list(dict.fromkeys([*given, *top, *sample]))  # the given features, the predictor's top, the sample
    groups = {f"random sample ({cfg.n})": sample, f"top {cfg.top} by {cfg.predictor}": top}
    site_dir = run.features(str(site))
    done = read_steering_results(site_dir)
    todo = [i for i in watch if i not in done]
    labels = dict(zip(table["index"], table["label"]))
    evaluation = FeatureEvaluation(steerer, site, watch, cfg)
    pairs = controls(table, watch, cfg.seed)
    for index in tqdm(todo, desc=f"steer features {site}", unit="feature", dynamic_ncols=True):
        result = judge_dials(evaluation.evaluate(index, labels[index] or "", pairs[index]), cfg)
        append_steering_result(site_dir, result)
        done[index] = result
    for result in done.values():
        judge_dials(result, cfg)
    results = [done[i] for i in watch]
    set_feature_columns(site_dir, feature_columns(list(done.values())), COLUMNS)
    return {"site": str(site), "results": results, "evaluated_now": len(todo),
            "groups": {name: set(indices) for name, indices in groups.items() if indices}}


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
    """The steer_* columns of features.parquet, by feature index: the decoder dial's chosen setting (what a
    feature ID with a scale but no dial uses), the best dial and its numbers."""
    def best(r):
        return r["tuned"] if r["dial"] == "tuned" else r

    columns = {"steer_op": lambda r: r["op"], "steer_scale": lambda r: r["scale"], "steer_units": lambda r: r["units"],
               "steer_positions": lambda r: r.get("positions", "all"),
               "steer_dial": lambda r: r["dial"], "steer_presence": lambda r: best(r)["presence"],
               "steer_gain": lambda r: best(r)["presence_gain"], "steer_concept": lambda r: best(r)["concept"],
               "steer_fluency": lambda r: best(r)["fluency"], "steer_score": lambda r: best(r)["score"],
               "steers": lambda r: r["steers"], "steer_prompts": lambda r: r["prompts"]}
    return {column: {r["index"]: pick(r) for r in results} for column, pick in columns.items()}


def summary(results: list[dict], predictors: dict[str, dict[int, float]], max_ppl_ratio: float = 2.0) -> dict:
    """What the benchmark reports, per dial: the share that steers visibly, the presence gains over unsteered
    and over the prompt baseline, fluency and cost; and how well each predictor from make label ranks the
    features that steer visibly (AUROC)."""
    n = len(results)
    out = {"features": n, "steer_share": sum(r["steers"] for r in results) / n if n else 0.0, "dials": {}}
    for name in ("decoder", "tuned"):
        reports = [r if name == "decoder" else r.get("tuned") for r in results]
        made = [d for d in reports if d]
        if not made:
            continue
        out["dials"][name] = {
            "made": len(made), "visibly": sum(d["visibly"] for d in made) / n,
            "presence_gain": float(np.mean([d["presence_gain"] for d in made])),
            "presence_over_baseline": float(np.mean([d["presence_over_baseline"] for d in made])),
            "matches_baseline": sum(d["presence_over_baseline"] >= 0 and d["within_limits"] for d in made) / n,
            "token_gain": float(np.mean([d["gain"] for d in made])),
            "perplexity_ratio": float(np.median([d["perplexity_ratio"] for d in made])),
            "repeats": float(np.mean([d["repeats"] for d in made])),
            "seconds": float(np.mean([d["train_seconds"] for d in made])) if name == "tuned" else None}
    out["by_op"] = {op: sum(r["op"] == op for r in results) for op in ("add", "clamp")}
    out["baseline_presence_gain"] = float(np.mean([r["baseline"]["presence"] - r["unsteered"]["presence"]
                                                   for r in results])) if n else 0.0
    out["predictors"] = {}
    for name, scores in predictors.items():
        scored = [r for r in results if scores.get(r["index"]) is not None]
        out["predictors"][name] = auroc([scores[r["index"]] for r in scored], [r["steers"] for r in scored])
    return out


def predictor_scores(run, site: str) -> dict[str, dict[int, float]]:
    """{predictor: {feature: score}} for each predictor of steering `make label` computed."""
    table = run.feature_table(site, ["index", *PREDICTORS]) or {}
    return {name: {int(i): s for i, s in zip(table["index"], table[name]) if s is not None and math.isfinite(s)}
            for name in PREDICTORS if name in table}


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """The chance that a feature that steers has a higher score than one that does not (ties half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def features_report(results: list[dict], s: dict, f: DictConfig, groups: dict[str, set[int]] | None = None) -> str:
    """A markdown summary: the headline numbers per dial (for all the features, then for each group of them:
    the random sample, the predictor's top), then one row per feature."""
    def cell(d):
        if not d:
            return "-"
        mark = " **visibly**" if d["visibly"] else ""
        return (f"{d['setting']}: {d['presence']:.2f} ({d['presence_gain']:+.2f} [{d['presence_gain_ci95'][0]:+.2f}, "
                f"{d['presence_gain_ci95'][1]:+.2f}]), ppl x{d['perplexity_ratio']:.2f}{mark}")

    rows = [[r["feature"], (r["label"] or "")[:36].replace("|", "/"), f"{r['unsteered']['presence']:.2f}",
             f"{r['baseline']['presence']:.2f}", cell(r), cell(r.get("tuned")), r["dial"]]
            for r in sorted(results, key=lambda r: -max(r["presence_gain"], (r.get("tuned") or {}).get("presence_gain", -1)))]
    dial_rows = [[name, f"{d['made']}", f"{d['visibly']:.0%}", f"{d['presence_gain']:+.3f}",
                  f"{d['presence_over_baseline']:+.3f}", f"{d['matches_baseline']:.0%}", f"{d['token_gain']:+.3f}",
                  f"{d['perplexity_ratio']:.2f}", f"{d['repeats']:.2f}",
                  "-" if d["seconds"] is None else f"{d['seconds']:.0f} s"] for name, d in s["dials"].items()]
    predictors = ", ".join(f"{name} {'n/a' if a is None else f'{a:.2f}'}" for name, a in s["predictors"].items())
    lines = [
        f"{s['features']} features at their site, {f.dev_prompts} dev / {f.test_prompts} test neutral prompts, greedy, "
        f"{f.max_new_tokens} new tokens. Presence = the share of test answers on one of whose tokens the feature fires "
        f"at {f.presence:g} x its max activation or more (read through the SAE in the unsteered model). A dial "
        f"**steers visibly** when presence rises by at least {f.min_presence_gain:g} over unsteered and over a random "
        f"live feature pushed as hard, the gain's 95% interval excludes 0, perplexity <= {f.max_ppl_ratio:g}x "
        f"unsteered and repeated 4-grams <= {f.max_repeats:g}. Decoder sweep: add {list(f.add_scales)} (x mean row "
        f"norm), clamp {list(f.clamp_scales)} (x max activation), add on the prompt only {list(f.prompt_scales)}; "
        f"tuned dial: {f.tune.steps} steps on up to {f.tune.max_pairs} dev pairs, acting at positions "
        f"{f.tune.positions}, swept x{list(f.tune.scales)}.", "",
        f"- **steers visibly (best dial): {s['steer_share']:.0%}** of the features; the prompt baseline raises presence "
        f"by {s['baseline_presence_gain']:+.3f} on average",
        f"- decoder dial's chosen op: add {s['by_op']['add']}, clamp {s['by_op']['clamp']}",
        f"- predictors from make label, AUROC for steering visibly: {predictors or 'none computed'}",
        *[group_line(name, [r for r in results if r["index"] in indices]) for name, indices in (groups or {}).items()],
        "",
        md_table(["dial", "made", "steers visibly", "presence gain", "over prompt baseline", "matches or beats baseline",
                  "token-share gain", "median ppl ratio", "repeated 4-grams", "tuning cost"], dial_rows), "",
        md_table(["feature", "label", "unsteered", "prompt baseline", "decoder dial: presence (gain [95% CI])",
                  "tuned dial: presence (gain [95% CI])", "best"], rows),
    ]
    return "\n".join(lines)


def group_line(name: str, results: list[dict]) -> str:
    """One group's headline: the share that steers visibly, by either dial and by each."""
    s = summary(results, {})
    dials = ", ".join(f"{dial} {d['visibly']:.0%} (matches or beats the prompt baseline: {d['matches_baseline']:.0%})"
                      for dial, d in s["dials"].items())
    return f"- {name}: {s['features']} features, **{s['steer_share']:.0%} steer visibly**; by dial: {dials}"
