"""Concurrent steered requests sharing forwards: the steering server's scheduler.

    scheduler = Scheduler(steerer, max_batch=8, wait_s=0.02, max_waiting=32)
    ticket = scheduler.submit(Row(ids, steerer.hooks(["L15.resid_post/1234 scale=4"]), max_new_tokens=64))
    generation = ticket.result()

Requests that arrive together (the first waits up to `wait_s` for company) run as one left-padded
batch of at most `max_batch` rows, and each row keeps its own interventions: a site's hook hands each
row's slice of the batch to that row's own hook function (steering/interventions.py site_hook, with
its conditions), so a row's edits never touch another row. Each row also has its own sampling
(temperature, top_p and a seeded generator of its own), stop strings, token budget and time limit,
and leaves the batch, its KV-cache rows dropped, when it finishes or its client goes away.

Greedy rows generate what they would alone. Rows that arrive while a batch runs wait for the next
one; more than `max_waiting` of them and the next request is refused (the server answers 429).

A row's failure is its own: an exception in its hooks or its sampling, or logits that are no longer
finite (an extreme steering scale), ends that row with the exception as its last event, and the
other rows go on as they would have alone. Only a failed forward fails the whole batch.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from activations.errors import ConfigError
from steering.interventions import SteeringError
from steering.routing import routing
from steering.steerer import Generation, Steerer


class Busy(Exception):
    """The scheduler's queue is full: the client should retry later."""


@dataclass
class Row:
    """One request: its prompt's token ids, its hook functions and how it generates."""

    ids: torch.Tensor  # [seq]
    hooks: dict  # {site: hook function}, from Steerer.hooks(interventions)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    max_time: float | None = None  # seconds; then it finishes as "length"
    routes: list = field(default_factory=list)  # its expert routes (steering/routing.py): it then runs alone
    tokens: list[int] = field(default_factory=list)  # generated so far
    events: queue.Queue = field(default_factory=queue.Queue)  # token ids, then a Generation or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    failure: Exception | None = None  # raised by one of its hooks in this forward: it leaves after it


class Ticket:
    """What a submitter holds: the tokens as they come, the Generation at the end, or a way to give up."""

    def __init__(self, row: Row):
        self.row = row

    def result(self, on_token=None, gone=lambda: False, poll_s: float = 0.25) -> Generation:
        """Wait for the Generation, calling on_token(id) for each new token; when gone() says the
        client has left (or on_token fails), the row is cancelled and ConnectionError raised."""
        checked = time.monotonic()
        while True:
            try:
                event = self.row.events.get(timeout=poll_s)
            except queue.Empty:
                event = None
            if time.monotonic() - checked >= poll_s:  # tokens may come faster than poll_s: look anyway
                checked = time.monotonic()
                if gone():
                    self.cancel()
                    raise ConnectionError("the client went away")
            if event is None:
                continue
            if isinstance(event, Generation):
                return event
            if isinstance(event, BaseException):
                raise event
            if on_token is not None:
                try:
                    on_token(event)
                except BaseException:
                    self.cancel()
                    raise

    def cancel(self) -> None:
        self.row.cancelled.set()


class Scheduler:
    """One thread that runs the submitted rows in batches on the Steerer's model."""

    def __init__(self, steerer: Steerer, max_batch: int = 8, wait_s: float = 0.02, max_waiting: int = 32):
        if max_batch < 1 or max_waiting < 1 or wait_s < 0:
            raise ConfigError(f"batching needs max_batch >= 1, max_waiting >= 1 and a wait >= 0, not {max_batch}, "
                              f"{max_waiting} and {wait_s:g} s: fix serve.limits")
        self.steerer, self.max_batch, self.wait_s = steerer, max_batch, wait_s
        self.waiting: queue.Queue[Row] = queue.Queue(max_waiting)
        self.held: Row | None = None  # a row taken from the queue that must start a batch of its own
        threading.Thread(target=self._serve, daemon=True, name="dialbox-scheduler").start()

    def submit(self, row: Row) -> Ticket:
        try:
            self.waiting.put_nowait(row)
        except queue.Full:
            raise Busy(f"{self.waiting.maxsize} requests are already waiting (serve.limits.max_waiting): "
                       "retry shortly") from None
        return Ticket(row)

    def _serve(self) -> None:
        while True:
            batch = self._gather()
            try:
                generate_batch(self.steerer, batch)
            except Exception as e:  # a failed forward fails its rows, not the scheduler
                for row in batch:
                    row.events.put(e)

    def _gather(self) -> list[Row]:
        """The next batch: the first waiting row, and whatever else arrives within wait_s of it. A row
        with expert routes runs alone: a route re-chooses the router's experts for every row of a forward."""
        first, self.held = self.held or self.waiting.get(), None
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch and not first.routes:
            try:
                row = self.waiting.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if row.routes:
                self.held = row  # the next batch's first
                break
            batch.append(row)
        return [row for row in batch if not row.cancelled.is_set()]


def generate_batch(steerer: Steerer, rows: list[Row]) -> None:
    """Generate every row to its end in one batch, rows leaving as they finish; each row's events
    get its tokens as they come and then its Generation."""
    if not rows:
        return
    ids, mask = steerer.left_padded([r.ids for r in rows])
    device = steerer.device
    ids, mask = ids.to(device), mask.to(device)
    live = list(rows)  # the rows still in the batch, in batch order
    started = time.monotonic()
    generators = {}  # a seeded generator per row, made where the logits are (the last GPU of a device_map)
    cache = DynamicCache(config=steerer.model.config)  # the layer kinds the model needs (DeepSeek-V4 compresses)
    with (steerer.lock, torch.inference_mode(), steerer.adapter.hooks(batch_hooks(rows, lambda: live)),
          routing(steerer.adapter, [route for row in rows for route in row.routes])):
        step_ids, positions = ids, (mask.cumsum(-1) - 1).clamp_min(0)
        while live:
            logits = steerer.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache,
                                   use_cache=True, logits_to_keep=1).logits[:, -1].float()  # the prompt's: only the last
            if not generators:
                generators = {id(r): torch.Generator(logits.device).manual_seed(r.seed) for r in rows}
            finite = logits.isfinite().all(-1).tolist()  # one check of the whole batch a step, not one per row
            keep = [j for j, row in enumerate(live)
                    if advance(steerer, row, logits[j], finite[j], generators[id(row)], started)]
            if len(keep) < len(live):
                if keep:  # reorder_cache: the one batch edit every cache layer implements in full (DeepSeek-V4's
                    # compressed-attention buffers too; batch_select_indices leaves them at the old batch size)
                    cache.reorder_cache(torch.tensor(keep, device=device))
                mask, live = mask[keep], [live[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            step_ids = torch.tensor([row.tokens[-1] for row in live], device=device, dtype=torch.long)[:, None]
            positions = mask.sum(-1, keepdim=True) - 1


def advance(steerer: Steerer, row: Row, logits: torch.Tensor, finite: bool, generator: torch.Generator,
            started: float) -> bool:
    """Give the row its next token; whether it stays in the batch. A row whose hooks or sampling failed, or
    whose logits are not all finite, gets the exception as its last event and leaves: the failure is its alone."""
    try:
        if row.failure is not None:
            raise row.failure
        if not finite:
            raise SteeringError(f"the model's logits are not finite (NaN or infinite) after {len(row.tokens)} "
                                "tokens: its steering pushed the activations out of range; lower the scale")
        token = choose(logits, row, generator)
    except Exception as e:
        row.events.put(e)
        return False
    row.tokens.append(token)
    row.events.put(token)
    if not finished(steerer, row, started):
        return True
    if not row.cancelled.is_set():
        row.events.put(steerer.finish(row.tokens, len(row.ids), row.stop))
    return False


def generate_rows(steerer: Steerer, rows: list[Row], max_batch: int) -> list[Generation]:
    """Every row generated to its end, `max_batch` rows at a time, without the scheduler's thread: for a
    batch job whose rows each carry their own interventions (make steer-features sweeps settings this way)."""
    for i in range(0, len(rows), max_batch):
        generate_batch(steerer, rows[i: i + max_batch])
    return [Ticket(row).result() for row in rows]  # all its events are in: its tokens, then its Generation


def batch_hooks(rows: list[Row], live) -> dict:
    """{site: hook} for the batch: each live row's slice goes through that row's own hook at the site.
    A hook that raises leaves its row's slice as it was and marks the row failed (advance ends it)."""
    sites = {site for row in rows for site in row.hooks}

    def edited(row: Row, site, piece: torch.Tensor) -> torch.Tensor | None:
        if row.failure is not None or site not in row.hooks:
            return None
        try:
            return row.hooks[site](piece)
        except Exception as e:
            row.failure = e
            return None

    def at(site):
        def fn(batch: torch.Tensor):
            pieces, changed = [], False
            for j, row in enumerate(live()):
                piece = batch[j:j + 1]
                new = edited(row, site, piece)
                changed |= new is not None
                pieces.append(piece if new is None else new)
            return torch.cat(pieces) if changed else None

        return fn

    return {site: at(site) for site in sites}


def choose(logits: torch.Tensor, row: Row, generator: torch.Generator) -> int:
    """The row's next token: the argmax when greedy, else a draw from its own seeded generator."""
    if row.temperature == 0:
        return int(logits.argmax())
    # Shifted so the top logit is 0 and in float64: however small the temperature, nothing overflows
    # (the rest go to -inf, probability 0, and the top token is left).
    probs = torch.softmax((logits.double() - logits.max()) / row.temperature, dim=-1)
    if row.top_p < 1:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= row.top_p  # the nucleus keeps the top token at least
        probs = probs.scatter(0, order, ordered.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def finished(steerer: Steerer, row: Row, started: float) -> bool:
    """Whether the row leaves the batch: cancelled, at an end of turn or a stop string, or out of
    tokens or time (Steerer.finish then says which of stop and length it was)."""
    return (row.cancelled.is_set() or row.tokens[-1] in steerer.eos_ids or len(row.tokens) >= row.max_new_tokens
            or (row.max_time is not None and time.monotonic() - started >= row.max_time)
            or any(s in steerer.tokenizer.decode(row.tokens, skip_special_tokens=True) for s in row.stop))
