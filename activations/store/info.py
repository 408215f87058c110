"""What a store holds: sites, tokens, shards, bytes, codecs and identity."""

from __future__ import annotations

import json

from activations.store.format import StoreError, router_key
from activations.store.blocks import human_size
from activations.store.reader import ActivationStore, ShardRecord


def describe(store: ActivationStore) -> dict:
    """Everything `info` shows, as plain data."""
    sizes = store.root.sizes()

    def bytes_under(prefix: str) -> int:
        return sum(size for key, size in sizes.items() if key.startswith(prefix))

    shards = []
    for rec in store.shard_records:
        written = _written_rows(store, rec)
        shards.append({"name": rec.name, "rows": rec.rows, "consumed": rec.consumed, "done": rec.done,
                       "uncommitted_rows": max(written - rec.rows, 0), "bytes": bytes_under(f"shards/{rec.name}/")})
    sites = {site: {"width": store.width(site),
                    "bytes": sum(bytes_under(f"shards/{rec.name}/{site}/") for rec in store.shard_records)}
             for site in store.sites}
    router = {layer: {**spec, "bytes": sum(bytes_under(f"shards/{rec.name}/{router_key(layer, part)}/")
                                           for rec in store.shard_records for part in ("ids", "weights"))}
              for layer, spec in store.router.items()}
    return {
        "store": str(store.root), "identity": store.identity, "origin": store.origin, "dtype": store.dtype,
        "chunk_rows": store.chunk_rows, "codecs": codecs_of(store), "world_size": store.world_size,
        "tokens": store.n_tokens, "complete": store.complete, "sites": sites, "router": router, "shards": shards,
        "bytes": sum(sizes.values()),
    }


def _written_rows(store: ActivationStore, rec: ShardRecord) -> int:
    """Rows a shard's writer has put down, committed or not (0 before it starts)."""
    array, problem = store.open_array(rec.name, "tokens")
    return array.shape[0] if array is not None and not problem else 0


def codecs_of(store: ActivationStore) -> list[str]:
    for rec in store.shard_records:
        try:
            array = store.shard_array(rec.name, store.sites[0])
        except StoreError:
            continue
        return [codec.to_dict()["name"] for codec in array.metadata.codecs]
    return []


def format_info(d: dict) -> str:
    identity = " ".join(f"{k}={v}" for k, v in d["identity"].items())
    writing = ", ".join(f"{s['name']} ({s['uncommitted_rows']} rows written past its commit)"
                        for s in d["shards"] if not s["done"])
    lines = [
        f"store     {d['store']}",
        f"identity  {identity}",
        *([f"origin    {json.dumps(d['origin'])}"] if d["origin"] else []),
        f"layout    {d['dtype']}, {d['chunk_rows']} rows per chunk, codecs {'+'.join(d['codecs']) or '-'}, "
        f"{d['world_size']} shard(s)",
        f"tokens    {d['tokens']} committed; " + ("complete" if d["complete"] else f"still being written: {writing}"),
        f"bytes     {human_size(d['bytes'])} on storage",
        "",
        f"{'site':<20} {'width':>7} {'bytes':>12}",
        *(f"{site:<20} {s['width']:>7} {human_size(s['bytes']):>12}" for site, s in d["sites"].items()),
        *_router_lines(d["router"]),
        "",
        f"{'shard':<20} {'rows':>12} {'consumed':>12} {'done':>5} {'bytes':>12}",
        *(f"{s['name']:<20} {s['rows']:>12} {s['consumed']:>12} {str(s['done']).lower():>5} {human_size(s['bytes']):>12}"
          for s in d["shards"]),
    ]
    return "\n".join(lines)


def _router_lines(router: dict) -> list[str]:
    """The router arrays: per routed layer its choice (hashed or learned), top_k of n experts, bytes."""
    if not router:
        return []
    return ["", f"{'router':<20} {'routing':>7} {'top_k':>6} {'experts':>8} {'B/token':>8} {'bytes':>12}",
            *(f"{'L' + str(layer):<20} {'hash' if spec['hashed'] else 'learned':>7} {spec['top_k']:>6} "
              f"{spec['n_experts']:>8} {4 * spec['top_k']:>8} {human_size(spec['bytes']):>12}"
              for layer, spec in router.items())]
