"""The training loop's state: every SAE being trained, stepped together on shared batches.

A `Member` is one SAE (one site, one point of a sweep) with its optimiser, schedule and
dead-latent counters. `Trainer.step` feeds one batch to every member; under
torch.distributed data parallelism each rank passes its share of the batch and the
gradients and firing masks are averaged across ranks, so N ranks compute what one
process would on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from sae_lens.saes.sae import TrainingSAE

from sae.step import training_step
from activations.errors import DialboxError


class TrainingError(DialboxError, RuntimeError):
    """Training cannot go on (a NaN loss, a checkpoint that does not fit)."""


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_fraction)
    if decay_steps and step >= total_steps - decay_steps:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


@dataclass
class Member:
    tag: str  # e.g. "k32"; the first member of a site is its primary SAE
    site: str
    sae: TrainingSAE
    scale: float  # activations are multiplied by this during training
    base_lr: float
    # matryoshka_topk's inner levels, (width, loss weight): the fast step's nested losses (sae-lens's Matryoshka has its own)
    levels: tuple[tuple[int, float], ...] = ()
    optimizer: torch.optim.Optimizer = None
    steps_since_fired: torch.Tensor = None
    fire_counts: torch.Tensor = None  # tokens each latent fired on, since the last histogram
    last: dict = field(default_factory=dict)  # last logged numbers
    history: list = field(default_factory=list)  # the logged numbers at each checkpoint

    def __post_init__(self):
        d_sae = self.sae.cfg.d_sae
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=(0.9, 0.999), fused=True)
        device = self.sae.W_dec.device
        self.steps_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long, device=device)

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(), "scale": self.scale,
                "steps_since_fired": self.steps_since_fired, "fire_counts": self.fire_counts,
                "d_in": self.sae.cfg.d_in, "d_sae": self.sae.cfg.d_sae, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if (state["d_in"], state["d_sae"]) != (self.sae.cfg.d_in, self.sae.cfg.d_sae):
            raise TrainingError(
                f"checkpoint of {self.site}/{self.tag} has d_in={state['d_in']}, d_sae={state['d_sae']}; "
                f"this run has d_in={self.sae.cfg.d_in}, d_sae={self.sae.cfg.d_sae}: delete the checkpoint "
                "or use another run_name"
            )
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale = state["scale"]
        self.steps_since_fired.copy_(state["steps_since_fired"])
        self.fire_counts.copy_(state["fire_counts"])
        self.history = list(state["history"])


def dead_window(sae_cfg, training_tokens: int, dead_tokens: int = 0) -> int:
    """Tokens a latent may go without firing before it counts as dead (and AuxK trains it): `dead_tokens`
    when set, else a tenth of the training tokens, at most 10M, and for a TopK-family SAE at most 200
    of a latent's mean firing periods (d_sae / k tokens). On SynthSAEBench's recipe at 512 features
    (BENCHMARKS.md, bench-synth-quick; width 512, k 5: a period of 102 samples) windows of 10k-50k samples
    gave F1 0.67-0.70 and 0-4 dead latents, a tenth of the 2-4M samples 0.62-0.64 and 40: a latent that
    died early waited the whole window for AuxK to revive it (5k samples was too short: 0.62, 32 dead)."""
    if dead_tokens:
        return int(dead_tokens)
    window = min(10_000_000, max(1, training_tokens // 10))
    k = getattr(sae_cfg, "k", None)
    return min(window, 200 * sae_cfg.d_sae // k) if k else window


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Trainer:
    def __init__(self, members: list[Member], total_steps: int, cfg, data_parallel: bool = False):
        self.members = members
        self.total_steps = total_steps
        self.cfg = cfg
        self.data_parallel = data_parallel and _distributed()
        self.step_count = 0
        self.tokens = 0

    def dead_mask(self, member: Member, batch_size: int) -> torch.Tensor:
        window = dead_window(member.sae.cfg, self.total_steps * self.cfg.batch_size, self.cfg.dead_tokens)
        return member.steps_since_fired * batch_size >= window

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One optimiser step of every member on this batch (this rank's share of it)."""
        factor = lr_factor(self.step_count, self.total_steps, self.cfg.lr_warmup_steps, self.cfg.lr_decay_fraction)
        rows = next(iter(batch.values())).shape[0]
        global_rows = rows * (dist.get_world_size() if self.data_parallel else 1)
        for m in self.members:
            x = batch[m.site].float() * m.scale
            out = training_step(m.sae, x, self.dead_mask(m, global_rows), self.step_count, self.cfg.bf16_encoder,
                                self.cfg.triton_kernels, m.levels)
            if not torch.isfinite(out.loss):
                raise TrainingError(f"loss of {m.site}/{m.tag} became {out.loss.item()} at step {self.step_count}")
            out.loss.backward()
            counts = out.fire_counts
            if self.data_parallel:
                self._average_gradients(m)
                dist.all_reduce(counts)
            torch.nn.utils.clip_grad_norm_(m.sae.parameters(), 1.0)  # as sae-lens's trainer does
            for group in m.optimizer.param_groups:
                group["lr"] = m.base_lr * factor
            m.optimizer.step()
            m.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                m.steps_since_fired += 1
                m.steps_since_fired[counts > 0] = 0
                m.fire_counts += counts
                if self._logging_step():
                    err = (out.recon - x).pow(2).sum()
                    var = (x - x.mean(0)).pow(2).sum()
                    m.last = {"loss": out.loss.item(), "fvu": (err / var).item(), "l0": out.l0.item(),
                              "dead_frac": self.dead_mask(m, global_rows).float().mean().item()}
        self.step_count += 1
        self.tokens += global_rows

    def _logging_step(self) -> bool:
        return self.step_count % self.cfg.log_every == 0 or self.step_count == self.total_steps - 1

    @staticmethod
    def _average_gradients(member: Member) -> None:
        world = dist.get_world_size()
        for p in member.sae.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    def record_checkpoint(self) -> None:
        """Keep each member's latest training numbers with the step they belong to."""
        for m in self.members:
            m.history.append({"step": self.step_count, "tokens": self.tokens, **m.last})

    def state_dict(self) -> dict:
        return {"step": self.step_count, "tokens": self.tokens,
                "members": {f"{m.site}/{m.tag}": m.state_dict() for m in self.members}}

    def load_state_dict(self, state: dict) -> None:
        names = {f"{m.site}/{m.tag}" for m in self.members}
        if set(state["members"]) != names:
            raise TrainingError(
                f"the checkpoint trains {sorted(state['members'])}, this run {sorted(names)}: "
                "use the same sites and sweep, or another run_name"
            )
        for m in self.members:
            m.load_state_dict(state["members"][f"{m.site}/{m.tag}"])
        self.step_count, self.tokens = state["step"], state["tokens"]

    @staticmethod
    def log_density(member: Member, tokens: int) -> torch.Tensor:
        """log10 of each latent's firing rate over the tokens since its counters were reset."""
        return torch.log10(member.fire_counts.float() / max(tokens, 1) + 1e-10)


def total_steps_for(tokens: int, batch_size: int) -> int:
    return max(1, math.floor(tokens / batch_size))
