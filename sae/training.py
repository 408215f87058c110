"""A training run: one SAE per site (plus any sweep) from a run's activation store, saved where
`sae_lens.SAE.load_from_disk` reads it and evaluated on held-out text.

Every SAE reads the same shuffled batches, each batch read once from disk. Checkpoints
are written every `train.checkpoint_every` steps; a killed run started again with the
same config continues from the last one with the same data order. At the end each SAE
is saved, evaluated with the reconstruction spliced into the model, and its metrics written
to `metrics.json` beside it.
"""


from __future__ import annotations

import json
import math
from dataclasses import dataclass
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from sae_lens import SAE
from tqdm import tqdm

from activations.models import load_tokenizer, resolve_device
from activations.atomic import replacing, write_text
from activations.corpus import iter_windows, windows_for_tokens
from activations.rundir import RunDir, sae_metrics
from activations.sites import Site, SiteError
from activations.store import ActivationStore, StoreError
from sae.architectures import build_sae, inner_levels, learning_rate
from sae.metrics import spliced_metrics
from sae.trainer import Member, Trainer, TrainingError, total_steps_for
from activations.errors import ConfigError


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Joins the process group when started by torchrun or as
    the tasks of one Submitit job (launcher=slurm: a task per GPU); each rank of a node gets its own GPU."""
    if os.environ.get("SUBMITIT_EXECUTOR") and "WORLD_SIZE" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # Submitit draws the rendezvous port from 20000-60000 by job ID, which can be a port in use (Linux hands
        # out 32768-60999 to outgoing connections): rank 0 then fails to listen and the others wait for good.
        # A MASTER_PORT set in the job's environment is used instead.
        port = os.environ.pop("MASTER_PORT", None)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if port:
            os.environ["MASTER_PORT"] = port
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # Triton kernels launch on the current GPU, not their tensors'
        return 0, 1, device
    if device.type == "cuda":  # a node's GPUs are all visible to each task, unless Slurm bound one per task
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def open_store(run: RunDir, allow_partial: bool) -> ActivationStore:
    store = run.open_store()
    if not store.complete and not allow_partial:
        raise StoreError(
            f"the store in {store.root} is still being written ({store.n_tokens} committed tokens{_unmanifested(store)}): "
            "wait for the harvest, or set train.allow_partial_store=true to train on the committed rows"
        )
    if store.n_tokens == 0:
        raise StoreError(f"the store in {store.root} has no committed tokens{_unmanifested(store)}: "
                         "run `make harvest` first")
    return store


def _unmanifested(store: ActivationStore) -> str:
    """Rows on storage that no manifest commits, which a store being written and a store whose manifest
    was deleted both show: said, so that 0 committed tokens beside 198k written is not a mystery."""
    return "".join(f"; shard {name} has {rows} rows written but no manifest (deleted, or not committed yet: "
                   f"`python -m pipeline.store verify {store.root}` tells)" for name, rows in store.unmanifested().items())


def check_stats(store: ActivationStore, batch: dict, mean_norms: dict) -> None:
    """Refuse statistics that disagree with the rows read: the activation scale, b_dec's start and the
    outlier cut all come from them, and a damaged manifest would train every SAE at the wrong scale.
    A batch's mean norm is within a few percent of the store's; a factor of 2 is damage."""
    for site, x in batch.items():
        read, committed = x.float().norm(dim=-1).mean().item(), mean_norms[site]
        if max(read, committed) > 2 * min(read, committed):
            raise StoreError(f"{site}: the statistics of the store in {store.root} give a mean row norm of "
                             f"{committed:.4g}, its first batch of {len(x)} rows {read:.4g}: its manifests are "
                             f"damaged; run `python -m pipeline.store verify {store.root}`")


def stats_checked(batches, store: ActivationStore, mean_norms: dict):
    """The batches, once the first has been checked against the store's statistics (check_stats)."""
    first = next(batches)
    check_stats(store, first, mean_norms)
    yield first
    yield from batches


def choose_sites(store: ActivationStore, wanted: list, rank: int, world: int, parallel: str) -> list[str]:
    sites = [str(Site.parse(s)) for s in wanted] or store.sites
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise SiteError(f"site {missing[0]} is not in the store (it has {', '.join(store.sites)}): "
                        "harvest it first or train one of those")
    if parallel not in ("data", "site"):
        raise ConfigError(f"train.parallel={parallel!r}: use data or site")
    if parallel == "site" and world > 1:
        sites = sites[rank::world]
        if not sites:
            raise ConfigError(f"rank {rank} has no site to train: use at most {len(store.sites)} ranks")
    return sites


def sweep_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(tag, SAE config) for the base SAE and each sweep entry; the base is tagged `base`."""
    variants = [("base", cfg.sae)]
    for overrides in cfg.train.sweep:
        tag = "_".join(f"{k}{v}" for k, v in overrides.items())
        variants.append((tag, OmegaConf.merge(cfg.sae, overrides)))
    return variants


def start_member(tag: str, site: str, sae_cfg, train_cfg, mean: torch.Tensor, mean_norm: float, metadata: dict,
                 device) -> Member:
    """A fresh SAE as training starts one: seeded weights, activations scaled to mean norm sqrt(d_in)
    (train.normalize), b_dec at the data mean (`mean`, `mean_norm`: the unscaled data's)."""
    d_in = mean.numel()
    scale = math.sqrt(d_in) / mean_norm if train_cfg.normalize else 1.0
    torch.manual_seed(train_cfg.seed)  # every rank starts from the same weights
    sae = build_sae(sae_cfg, d_in, metadata, str(device))
    with torch.no_grad():
        # Start b_dec at the data mean: real residual streams share a large mean direction, and
        # with b_dec = 0 the few latents aligned with it win every token and the rest never fire.
        sae.b_dec.copy_(mean * scale)
    return Member(tag, site, sae, scale, learning_rate(sae_cfg, sae.cfg.d_sae), inner_levels(sae_cfg, sae.cfg.d_sae))


def build_members(cfg: DictConfig, store: ActivationStore, sites: list[str], device) -> list[Member]:
    members = []
    for site in sites:
        stats = store.stats(site)
        metadata = {"model_name": store.identity["model"], "hook_name": site,
                    "context_size": store.identity.get("context_length")}
        for tag, sae_cfg in sweep_configs(cfg):
            members.append(start_member(tag, site, sae_cfg, cfg.train, torch.from_numpy(stats["mean"]),
                                        stats["mean_norm"], metadata, device))
    return members


def checkpoint_path(run: RunDir, rank: int, world: int, parallel: str) -> Path:
    """Site-parallel ranks train different SAEs, so each keeps its own checkpoint."""
    return run.train_checkpoint(rank if parallel == "site" and world > 1 else None)


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    """Atomically: a kill during the write leaves the previous checkpoint intact."""
    with replacing(path) as tmp:
        torch.save(trainer.state_dict(), tmp)


def training_batches(store: ActivationStore, sites: list[str], cfg: DictConfig, start_step: int,
                     stop_row: int | None = None, pin_memory: bool = False):
    """Shuffled batches from `start_step` on, epoch after epoch (a new order each epoch), from
    the store's rows before `stop_row` (all when None), read ahead by the store's threaded loader;
    `pin_memory` for a GPU consumer (activations/store/loader.py)."""
    steps_per_epoch = (store.n_tokens if stop_row is None else stop_row) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise StoreError(f"the store holds {store.n_tokens} tokens, fewer than one batch of "
                         f"{cfg.train.batch_size}: lower train.batch_size or harvest more")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        yield from store.iter_batches(sites, cfg.train.batch_size, seed=cfg.train.seed + epoch, start_batch=skip,
                                      shuffle_chunks=cfg.train.shuffle_chunks, drop_last=True, stop_row=stop_row,
                                      workers=cfg.train.loader_workers, pin_memory=pin_memory)
        epoch, skip = epoch + 1, 0


def local_share(batch: dict, rank: int, world: int, outlier_norm: float, mean_norms: dict) -> dict:
    """This rank's slice of the global batch, minus outlier-norm rows when asked."""
    rows = next(iter(batch.values())).shape[0]
    share = slice(rank * rows // world, (rank + 1) * rows // world)
    batch = {site: x[share] for site, x in batch.items()}
    if outlier_norm > 0:
        keep = torch.ones(share.stop - share.start, dtype=torch.bool)
        for site, x in batch.items():
            keep &= x.norm(dim=-1) <= outlier_norm * mean_norms[site]
        batch = {site: x[keep] for site, x in batch.items()}
    return batch


def start_wandb(cfg: DictConfig, run: RunDir, rank: int):
    import wandb

    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    return wandb.init(project=cfg.wandb.project, mode=mode, dir=str(run.root), name=f"{cfg.run.run_name}-train-r{rank}",
                      config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")


def log_step(wb, trainer: Trainer, histogram_tokens: int) -> int:
    """Numbers of every member to wandb; density histograms every 10 logs. Returns tokens since histograms."""
    import wandb

    logs = {f"{m.site}/{m.tag}/{k}": v for m in trainer.members for k, v in m.last.items()}
    if (trainer.step_count // trainer.cfg.log_every) % 10 == 0:
        for m in trainer.members:
            logs[f"{m.site}/{m.tag}/log10_density"] = wandb.Histogram(trainer.log_density(m, histogram_tokens).cpu())
            m.fire_counts.zero_()
        histogram_tokens = 0
    wb.log(logs, step=trainer.step_count)
    return histogram_tokens


@dataclass
class Heldout:
    batches: list  # (input_ids [b, L], keep [b, L]) for the spliced evaluation
    stop_row: int | None  # training leaves out the store's rows from here on
    fresh: bool  # False: no text was left to hold out, so the evaluation runs on training text


def plan_heldout(run: RunDir, cfg: DictConfig, store: ActivationStore) -> Heldout:
    """Held-out windows: from `eval.paths` when given, else the ones right after the harvested
    windows; when the harvest took the whole corpus, its last windows, whose rows (the store's
    last rows) training then leaves out."""
    harvested = run.harvest_config()
    data = harvested.data
    tokenizer = load_tokenizer(run.model_config())
    wanted = max(1, math.ceil(cfg.eval.tokens / data.context_length))
    stop_row, fresh = None, True
    if cfg.eval.paths:
        data = OmegaConf.merge(data, {"source": "jsonl", "paths": list(cfg.eval.paths), "max_docs": 0})
        heldout = list(iter_windows(data, tokenizer, max_windows=wanted))
    else:
        skip = windows_for_tokens(harvested.harvest.max_tokens, data.context_length)
        windows = list(iter_windows(data, tokenizer, max_windows=skip + wanted if skip else 0))
        heldout = windows[skip:skip + wanted] if skip else []
        if len(heldout) < wanted:  # the harvest took the whole corpus
            heldout = windows[-wanted:]
            fresh = harvested.harvest.world_size == 1 and store.complete
            if fresh:
                stop_row = store.n_tokens - sum(int(w.keep.sum()) for w in heldout)
    full = [w for w in heldout if len(w.tokens) == data.context_length]
    batches = [(torch.from_numpy(np.stack([w.tokens for w in full[i:i + cfg.eval.batch_size]])),
                torch.from_numpy(np.stack([w.keep for w in full[i:i + cfg.eval.batch_size]])))
               for i in range(0, len(full), cfg.eval.batch_size)]
    return Heldout(batches, stop_row, fresh)


def output_dir(run: RunDir, member: Member) -> Path:
    return run.saes(member.site) if member.tag == "base" else run.sweep_sae(member.site, member.tag)


def save_and_evaluate(cfg: DictConfig, run: RunDir, trainer: Trainer, heldout: Heldout, store: ActivationStore,
                      mean_norms: dict, seconds: float, trained_now: int) -> dict:
    """Fold the activation scale, save each SAE in sae-lens's format, evaluate the saved file."""
    from activations.adapters import make_adapter
    from activations.models import load_model

    model_cfg = run.model_config()
    model, _ = load_model(model_cfg)
    adapter = make_adapter(model, model_cfg)
    results = {}
    for m in trainer.members:
        out = output_dir(run, m)
        dead_frac = trainer.dead_mask(m, cfg.train.batch_size).float().mean().item()
        with torch.no_grad():
            m.sae.fold_activation_norm_scaling_factor(m.scale)
        m.sae.save_inference_model(out)
        saved = SAE.load_from_disk(out, device=str(next(model.parameters()).device))  # what users will load
        max_norm = cfg.train.outlier_norm * mean_norms[m.site]
        metrics = spliced_metrics(adapter, Site.parse(m.site), saved, heldout.batches, ce=cfg.eval.ce, max_norm=max_norm)
        metrics.update(
            site=m.site, architecture=cfg.sae.architecture if m.tag == "base" else m.tag,
            d_in=m.sae.cfg.d_in, d_sae=m.sae.cfg.d_sae, dead_frac=dead_frac, tokens_trained=trainer.tokens,
            tokens_per_s=trained_now / seconds if seconds else None, activation_scale=m.scale,
            eval_on_heldout_text=heldout.fresh, store_rows_trained_on=heldout.stop_row or store.n_tokens,
            history=m.history,  # training loss, FVU, L0 and dead fraction at each checkpoint
        )
        write_text(sae_metrics(out), json.dumps(metrics, indent=2))
        results[f"{m.site}/{m.tag}"] = metrics
    return results


def train(cfg: DictConfig) -> dict:
    run = RunDir.from_config(cfg)
    device = resolve_device(cfg.train.device, "train.device")
    rank, world, device = init_distributed(device)
    store = open_store(run, cfg.train.allow_partial_store)
    sites = choose_sites(store, list(cfg.train.sites), rank, world, cfg.train.parallel)
    members = build_members(cfg, store, sites, device)
    heldout = plan_heldout(run, cfg, store)
    tokens = cfg.train.tokens or (heldout.stop_row or store.n_tokens)
    trainer = Trainer(members, total_steps_for(tokens, cfg.train.batch_size), cfg.train,
                      data_parallel=cfg.train.parallel == "data")
    ckpt = checkpoint_path(run, rank, world, cfg.train.parallel)
    if ckpt.exists():
        trainer.load_state_dict(torch.load(ckpt, map_location=device, weights_only=False))
        print(f"train: resuming from step {trainer.step_count} ({trainer.tokens} tokens) of {ckpt}")
    writer = rank == 0 or cfg.train.parallel == "site"
    if writer:
        run.save_config(cfg, "train" if world == 1 else f"train.r{rank}")
    wb = start_wandb(cfg, run, rank) if writer else None

    mean_norms = {s: store.stats(s)["mean_norm"] for s in sites}
    started, start_tokens, histogram_tokens = time.perf_counter(), trainer.tokens, 0
    bar = tqdm(total=trainer.total_steps * cfg.train.batch_size, initial=trainer.tokens, unit="tok",
               unit_scale=True, desc=f"train r{rank}", disable=not writer, dynamic_ncols=True)
    batches = stats_checked(training_batches(store, sites, cfg, trainer.step_count, heldout.stop_row,
                                             pin_memory=device.type == "cuda"), store, mean_norms)
    try:
        while trainer.step_count < trainer.total_steps:
            share = (rank, world) if trainer.data_parallel else (0, 1)
            batch = local_share(next(batches), *share, cfg.train.outlier_norm, mean_norms)
            trainer.step({s: x.to(device, non_blocking=True) for s, x in batch.items()})
            bar.update(cfg.train.batch_size)
            histogram_tokens += cfg.train.batch_size
            if writer and (trainer.step_count - 1) % cfg.train.log_every == 0:
                histogram_tokens = log_step(wb, trainer, histogram_tokens)
                bar.set_postfix({k: f"{v:.3g}" for k, v in trainer.members[0].last.items()})
            if writer and trainer.step_count % cfg.train.checkpoint_every == 0:
                trainer.record_checkpoint()
                save_checkpoint(trainer, ckpt)
    except TrainingError as e:
        kept = torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else None
        where = f"the last good checkpoint (step {kept}) is kept at {ckpt}" if kept is not None else "no checkpoint yet"
        raise TrainingError(f"{e}; {where}: lower sae.lr or check the activations") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    if writer:
        save_checkpoint(trainer, ckpt)
    results = save_and_evaluate(cfg, run, trainer, heldout, store, mean_norms, seconds,
                                trainer.tokens - start_tokens) if writer else {}
    if wb is not None:
        wb.summary.update({f"eval/{k}/{m}": v for k, r in results.items() for m, v in r.items()
                           if isinstance(v, float)})
        wb.finish()
    return results
