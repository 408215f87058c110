"""Tuned dials: a steering vector at a feature's site, trained so that the model writes text on which
the feature fires (make steer-features builds one for every feature it evaluates).

Adding the feature's decoder row barely moves the text (BENCHMARKS.md, steer-features): the row says
what the feature reads, not what makes the model write it. A tuned dial learns the second from the
model's own answers to the dev prompts, in the spirit of RePS (AxBench's best trained vectors):

  positives  dev answers in which the concept is present and the text stays fluent: from the decoder
             dial's sweep, from samples under the decoder dial and under the prompt baseline (the request
             plus "Mention <label>"), each read after the plain request
  negatives  the unsteered model's answer to the same request

  loss       with +v added (on the request's positions only, by default, or at every position), the model
             should prefer the positive answer to the
             negative (mean log-likelihoods per token, a logistic loss of sharpness beta); with -v, the
             negative to the positive (RePS' second direction: v stays a direction of the concept, not a
             push toward whatever the positives share); under +v also the positives' negative
             log-likelihood (`nll`) and `kl` x the KL divergence from the unsteered model's next-token
             distributions along the negatives, so that the dial writes the concept into otherwise
             ordinary text

v starts as the decoder row and is trained alone: the model's weights stay frozen, and each step costs one
forward and one backward of the pairs. How strongly to apply it is then chosen on the dev prompts, as for
the decoder row (steering/feature_eval.py).

Where v acts (`tune.positions`): on the request's rows only (`prompt`), the dial reads to the model as
something it was asked, and the answer is written by the model unsteered, attending to them; at every
position (`all`) it also pushes each word the model writes. On SmolLM2 the first kept the answers fluent
where the second broke them before the concept came (docs/guide.md, "Which features steer, and their dials").
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Pair:
    """One preference: the request's token ids, an answer with the concept and one without."""

    context: torch.Tensor  # [c]
    positive: torch.Tensor  # [p]
    negative: torch.Tensor  # [n]


def tune_dial(steerer, site, start: torch.Tensor, pairs: list[Pair], cfg) -> tuple[torch.Tensor, list[float]]:
    """(the trained vector [width], the loss per step). start: the decoder row at its starting strength;
    cfg: steer_features.tune (DialTuningConfig)."""
    if not pairs:
        raise ValueError("a tuned dial needs at least one pair")
    device = steerer.device
    v = start.detach().float().to(device).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=cfg.lr * float(start.norm()))
    texts = [(p.context, p.positive) for p in pairs] + [(p.context, p.negative) for p in pairs]
    answers = torch.cat([a for _, a in texts]).to(device)
    rows = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(a) for _, a in texts])).to(device)
    negative = rows >= len(pairs)
    losses = []
    with frozen(steerer.model):
        with torch.no_grad():
            plain = answer_logprobs(steerer, site, texts, torch.zeros_like(v), cfg.positions)[negative]
        for step in range(cfg.steps):
            sign = 1.0 if step % 2 == 0 else -1.0
            logprobs = answer_logprobs(steerer, site, texts, sign * v, cfg.positions)
            taken = logprobs.gather(1, answers[:, None])[:, 0]
            means = torch.zeros(len(texts), device=device).index_add(0, rows, taken) / torch.bincount(rows)
            margin = means[: len(pairs)] - means[len(pairs):]
            loss = -F.logsigmoid(sign * cfg.beta * margin).mean()
            if sign > 0:
                kl = (plain.exp() * (plain - logprobs[negative])).sum(-1).mean()
                loss = loss - cfg.nll * means[: len(pairs)].mean() + cfg.kl * kl
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    return v.detach().cpu(), losses


def answer_logprobs(steerer, site, texts: list[tuple[torch.Tensor, torch.Tensor]], push: torch.Tensor,
                    positions: str = "all") -> torch.Tensor:
    """[answer positions, vocab] next-token log-probabilities at every answer position (each predicting the
    answer's next token), with `push` added at the site on the request's rows (positions=prompt), the answer's
    rows (generated: the first answer token is predicted from the request's last row, unpushed) or every row
    (all), as generation applies it; differentiable in push."""
    longest = max(len(c) + len(a) for c, a in texts)
    ids = torch.full((len(texts), longest), steerer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pushed = torch.zeros(len(texts), longest)
    for row, (c, a) in enumerate(texts):  # right-padded: positions count from 0 in every row
        ids[row, : len(c) + len(a)], mask[row, : len(c) + len(a)] = torch.cat([c, a]), 1
        start, end = len(c) if positions == "generated" else 0, len(c) if positions == "prompt" else len(c) + len(a)
        pushed[row, start:end] = 1
    pushed = pushed.to(steerer.device)

    def add(rows):  # rows [batch, seq, (hyper-connection streams,) width]
        return rows + (pushed.reshape(*pushed.shape, *(1,) * (rows.ndim - 2)) * push).to(rows.dtype)

    with steerer.adapter.hooks({site: add}):
        hidden = steerer.model.base_model(input_ids=ids.to(steerer.device),
                                          attention_mask=mask.to(steerer.device)).last_hidden_state
    picked = torch.cat([hidden[row, len(c) - 1: len(c) + len(a) - 1] for row, (c, a) in enumerate(texts)])
    return steerer.model.get_output_embeddings()(picked).float().log_softmax(-1)  # the LM head on answers only


@contextmanager
def frozen(model):
    """The model's weights out of autograd for the block: gradients flow to the dial only."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
