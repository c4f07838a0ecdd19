"""The embed job's driver: input fragments -> Ray Data actor pool (actor.py) -> committed Parquet.

Exactly-once and resumable (manifest.py): each fragment of the input (a JSONL file or byte range, or a
run of Parquet row groups) is embedded by one actor, written to a deterministic file name and committed
with a marker; a rerun skips committed fragments, and a retried fragment overwrites its own file.
Counts, tokens, padding and speed go to `_summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.fs as pafs

from rayembed.embed.actor import EmbedFragments
from rayembed.embed.config import EmbedConfig
from rayembed.embed.feed import PATH as FEED_PATH
from rayembed.embed.feed import feed_input
from rayembed.embed.inputs import input_fragments
from rayembed.embed.keys import drop_plan_files
from rayembed.embed.manifest import (
    COMMITTED,
    MANIFEST,
    TMP,
    Fragment,
    list_dir,
    open_output,
    read_json,
    write_json,
)
from rayembed.embed.plan import commit_quiet, make_plan
from rayembed.embed.rows import fs_for
from rayembed.embed.tables import (
    delta_storage,
    write_iceberg,
)
from rayembed.embed.versions import LATEST, chain, changes, current, latest, settings_check
from rayembed.io import ensure_ray, strip_scheme
from rayembed.model import Embedder, resolve_model_path
from rayembed.model.layout import frame_fit, model_revision, trained_in
from rayembed.tracking import log_job, registry_env


def plan_actors(cfg: EmbedConfig, fragments: int) -> tuple[int, float, float, int]:
    """(actors, CPUs per actor, GPUs per actor, threads per actor) from the cluster's resources."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return plan_for(cfg, fragments, nodes, int(ray.available_resources().get("CPU", 0)))


def plan_for(
    cfg: EmbedConfig, fragments: int, nodes: list[dict[str, float]], free: int
) -> tuple[int, float, float, int]:
    """`plan_actors` for these alive nodes' resources and `free` CPUs."""
    gpus = int(sum(r.get("GPU", 0) for r in nodes))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        if not gpus:
            raise ValueError("use_gpu=true but the Ray cluster has no GPUs")
        # A GPU waits on tokenizing (docs/benchmarks.md): each GPU actor takes its node's share of
        # CPUs, up to 8, as tokenizer threads.
        per_gpu = min(int(r.get("CPU", 0)) // int(r["GPU"]) for r in nodes if r.get("GPU", 0) >= 1)
        threads = cfg.threads_per_actor or max(1, min(8, per_gpu))
        return min(cfg.num_actors or gpus, fragments), float(threads), 1.0, threads
    node_cpus = [int(r.get("CPU", 0)) for r in nodes if r.get("CPU", 0) >= 1] or [1]
    # `free`: other jobs (e.g. Serve replicas) may hold some CPUs
    # By default one thread per actor (N one-thread actors out-ran N/2 two-thread ones, docs/benchmarks.md),
    # unless there are fewer fragments than CPUs: then the few actors share the free CPUs as threads.
    # An actor must fit on the smallest node and in what is free now.
    wanted = cfg.threads_per_actor or max(1, (free or 1) // max(1, min(fragments, free or 1)))
    threads = max(1, min(wanted, min(node_cpus), free or 1))
    actors = cfg.num_actors or max(1, min(sum(n // threads for n in node_cpus), free // threads))
    return max(1, min(actors, fragments)), float(threads), 0.0, threads


def settings_of(cfg: EmbedConfig) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(manifest settings: what shapes the vectors, Parquet schema metadata, lineage: where the model's
    parts came from, recorded in the manifest beside the settings and never compared on a resume)."""
    path = resolve_model_path(cfg.model, cfg.s3_endpoint_url)
    model = Embedder.load(path, device="cpu").set_reach(cfg.max_length, cfg.rope_scaling)
    dim = cfg.dim or model.dim
    if cfg.dim and cfg.dim > model.dim:
        raise ValueError(f"dim {cfg.dim} is larger than the model's {model.dim}")
    if cfg.precision == "binary" and dim % 8:
        raise ValueError(f"binary precision needs a dim divisible by 8, got {dim}")
    settings = {
        "model": model.name,
        "revision": model_revision(path),
        "dim": dim,
        "precision": cfg.precision,
        "normalized": model.normalize,
        "max_length": model.max_length,
        "text": [cfg.title_column, cfg.text_column],
        "prompt": model.prompt(cfg.prompt_name),
        "id_column": cfg.id_column,
    }
    if cfg.rope_scaling:
        settings["rope_scaling"] = cfg.rope_scaling
    # the output axes (a pca rotation's, or a distilled pair's): queries must come from that frame
    lineage = {}
    if model.frame:
        settings["frame"] = model.frame
        if fit := frame_fit(path):  # what its axes were fitted on (a corpus's rows rank that corpus best)
            lineage["frame_fit"] = fit
            if fit.get("source") == "corpus" and dim < model.dim:
                print(prefix_note(cfg.model, fit, dim), flush=True)
    if cfg.chunking:  # the model decides what fits: refused here, before any work
        settings["chunking"] = chunk_settings(cfg, model)
    if cfg.incremental_from:
        settings["base"] = cfg.incremental_from
    meta = {
        f"rayembed.{k}": str(v).lower()
        if isinstance(v, bool)
        else json.dumps(v)
        if isinstance(v, dict)
        else str(v)
        for k, v in (settings | lineage).items()
        if k != "text"
    }
    return settings, meta, lineage


def prefix_note(model: str, fit: dict[str, Any], dim: int) -> str:
    """Said when a prefix of axes fitted on one corpus embeds: other text keeps more at full width
    (measured twice: docs/benchmarks.md "Text of the corpus to embed")."""
    return (f"embed: {model}'s axes were fitted on the corpus it was distilled for ({fit.get('rows')} rows): "
            f"a {dim}-d prefix ranks that corpus best; other text keeps more of its quality at full width "
            '(docs/benchmarks.md "Text of the corpus to embed")')  # fmt: skip


def chunk_settings(cfg: EmbedConfig, model: Embedder) -> dict[str, Any]:
    """The chunking that shapes this output's rows, after checking the model can do it."""
    from rayembed.model.chunking import budget

    fits = budget(model, cfg.prompt_name)
    if cfg.chunk_tokens and cfg.chunk_tokens > fits:
        raise ValueError(f"chunk_tokens {cfg.chunk_tokens} does not fit the model's window: {fits} at most "
                         f"(max_length {model.max_length}, less its special tokens and prompt)")  # fmt: skip
    if cfg.chunking == "late" and (model.pooling != "mean" or model.latent is not None):
        raise ValueError(f"chunking=late pools each chunk's token states by their mean; {cfg.model} pools "
                         f"by {model.pooling}: use chunking=chunks")  # fmt: skip
    return {"mode": cfg.chunking, "tokens": cfg.chunk_tokens or fits, "overlap": cfg.chunk_overlap,
            "boundary": cfg.chunk_boundary}  # fmt: skip


def chunk_size(settings: dict[str, Any]) -> dict[str, Any]:
    return {"chunk_tokens": settings["chunking"]["tokens"]} if "chunking" in settings else {}


def check_base(cfg: EmbedConfig, settings: dict[str, Any]) -> None:
    """An incremental run's base must be an embed output made with the same settings, and not a version
    the output itself is (or its chain holds)."""
    if not cfg.incremental_from:
        return
    fs, root = fs_for(cfg.incremental_from, cfg.s3_endpoint_url), strip_scheme(cfg.incremental_from)
    if fs.get_file_info(f"{root}/{MANIFEST}").type != pafs.FileType.File:
        raise FileNotFoundError(
            f"incremental_from {cfg.incremental_from}: no {MANIFEST}, not an embed output"
        )
    settings_check(read_json(fs, f"{root}/{MANIFEST}")["settings"], settings)
    if strip_scheme(cfg.output) in {r for _, r in chain(fs, root, cfg.s3_endpoint_url)}:
        raise ValueError(
            f"output {cfg.output} is a version {cfg.incremental_from} is built on: give a new folder"
        )


def resolve_latest(cfg: EmbedConfig) -> EmbedConfig:
    """`incremental_from: latest`: the newest finished version in the output's parent folder, or a full
    run when there is none yet (the first night)."""
    if cfg.incremental_from != LATEST:
        return cfg
    fs, root = fs_for(cfg.output, cfg.s3_endpoint_url), strip_scheme(cfg.output)
    found = latest(fs, posixpath.dirname(root), other_than=root)
    scheme = cfg.output[: cfg.output.index("://") + 3] if "://" in cfg.output else ""
    return dataclasses.replace(cfg, incremental_from=f"{scheme}{found}" if found else None)


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Run (or resume) the job on the current Ray cluster, starting a local one if none; returns the summary."""
    start = time.time()
    cfg = resolve_latest(cfg)
    settings, meta, lineage = settings_of(cfg)
    out_fs = fs_for(cfg.output, cfg.s3_endpoint_url)
    root = strip_scheme(cfg.output)
    fragments, source, detection = input_fragments(cfg, settings)  # bad input: refused before any work
    check_base(cfg, settings)
    done = open_output(root, out_fs, settings, cfg.overwrite, lineage)
    if detection.get("path") == FEED_PATH:  # the feed's rows, netted, become this run's fragments
        storage = delta_storage(cfg.input, cfg.s3_endpoint_url)
        fragments, detection = feed_input(cfg, storage, detection["since"], detection["version"])
    planned = None  # an incremental run: what changed, found by tasks that hold a range of ids each
    if cfg.incremental_from:
        planned = make_plan(cfg, fragments, source, detection.get("removed"))
    pending = [f for f in fragments if f.name not in done]
    resumed, quiet = len(fragments) - len(pending), []
    if planned is not None and "busy" in planned:  # what has nothing to embed needs no actor (nor model)
        busy = set(planned["busy"])
        quiet = [f for f in pending if f.name not in busy]
        commit_quiet(out_fs, root, quiet)
        pending = [f for f in pending if f.name in busy]
    run, plan = run_actors(cfg, settings, meta, pending, source, planned is not None, start)
    if out_fs.get_file_info(f"{root}/{TMP}").type == pafs.FileType.Directory:
        out_fs.delete_dir(f"{root}/{TMP}")
    summary = summarize(cfg, root, out_fs, run, fragments, resumed, time.time() - start)
    summary["plan"] = plan
    if planned is not None:  # committed from the plan's scan, no actor: nothing in them to embed
        summary["fragments_unchanged"] = len(quiet)
    return finish(cfg, root, out_fs, summary, planned, detection)


def run_actors(
    cfg: EmbedConfig,
    settings: dict[str, Any],
    meta: dict[str, str],
    pending: list[Fragment],
    source: str,
    planned: bool,
    start: float,
) -> tuple[Counter[str], dict[str, float]]:
    """The actor pool over the fragments to embed: (this run's counts, its actors; none without work)."""
    import ray.data

    run: Counter[str] = Counter()
    plan: dict[str, float] = {}
    if not pending:
        return run, plan
    ensure_ray()
    actors, cpus, gpus, threads = plan_actors(cfg, len(pending))
    plan = {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus}
    items = [{"fragment": json.dumps(dataclasses.asdict(f))} for f in pending]
    out = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EmbedFragments,
        batch_size=1,
        fn_constructor_kwargs={
            # a table's files: where they are; the chunk size as the driver settled it
            "cfg": dataclasses.asdict(cfg) | {"input": source} | chunk_size(settings),
            "meta": meta,
            "device": "cuda" if gpus else "cpu",
            "threads": threads,
            "planned": planned,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
        # glibc gives each new thread (an actor's reader thread per fragment, tokenizer threads) its
        # own malloc arena, up to 8 per core, each keeping what it freed: an actor's RSS grew with the
        # fragments it had done (738 -> 1,349 MB from 1k to 100k long documents). 2 arenas keep it
        # flat at the same speed (docs/benchmarks.md "Long documents").
        runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2", **registry_env(cfg.model)}},
    )
    with _progress(len(pending), cfg.progress) as tick:
        for row in out.iter_rows():
            stats = json.loads(row["stats"])
            run.update(stats)
            # threads the actors run, which a local cluster's spare logical CPUs do not raise
            plan["threads_per_actor"] = max(plan.get("threads_per_actor", 0), int(row["threads"]))
            tick(stats.get("rows_out", 0), run["rows_out"] / max(time.time() - start, 1e-9))
    return run, plan


def finish(
    cfg: EmbedConfig, root: str, out_fs: Any, summary: dict[str, Any], planned: Any, detection: dict[str, Any]
) -> dict[str, Any]:
    """After the fragments: an incremental version's counts, the Iceberg commit, the tracked run, and
    `_summary.json`."""
    if planned is not None:  # an incremental version: what it re-embedded, kept and found gone
        summary["incremental_from"] = cfg.incremental_from
        summary["deleted"] = planned["deleted"]
        detection.pop("removed", None)
        summary["change_detection"] = detection | {
            "ranges": 1 << planned["bits"],
            "base_ids": planned["base_ids"],
        }
    if cfg.iceberg_append:  # the table brought to this version's view, in one commit tagged with the output
        summary["iceberg_append"] = write_iceberg(
            cfg.iceberg_append, cfg.iceberg_catalog, cfg.output, cfg.incremental_from,
            view=lambda: current(out_fs, root, endpoint_url=cfg.s3_endpoint_url), delta=lambda: changes(out_fs, root),
        )  # fmt: skip
    if cfg.tracking:
        made_by = trained_in(resolve_model_path(cfg.model, cfg.s3_endpoint_url))  # a folder's training run
        summary["tracking"] = log_job(
            cfg.tracking, "embed", dataclasses.asdict(cfg), summary, cfg.model, made_by
        )
    write_json(out_fs, f"{root}/_summary.json", summary)
    if planned is not None:  # the plan's files served their run (the next night reads `_keys`)
        drop_plan_files(out_fs, root)
    return summary


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar over fragments (rows and docs/s in the postfix) as a context manager yielding tick()."""
    from contextlib import contextmanager

    from tqdm.auto import tqdm

    @contextmanager
    def bar() -> Iterator[Callable[[int, float], None]]:
        with tqdm(total=total, unit="fragment", disable=not enabled, desc="embed") as b:
            rows = 0

            def tick(n: int, rate: float) -> None:
                nonlocal rows
                rows += n
                b.update(1)
                b.set_postfix(rows=rows, docs_s=f"{rate:.0f}")

            yield tick

    return bar()


def summarize(
    cfg: EmbedConfig,
    root: str,
    fs: pafs.FileSystem,
    run: Counter[str],
    fragments: list[Fragment],
    skipped: int,
    wall: float,
) -> dict[str, Any]:
    """Totals over every committed fragment, plus this run's speed."""
    total: Counter[str] = Counter()
    for record in (read_json(fs, i.path) for i in list_dir(fs, f"{root}/{COMMITTED}")):
        total.update({k: v for k, v in record.items() if isinstance(v, int)})
    rejects = {k.split(":", 1)[1]: v for k, v in sorted(total.items()) if k.startswith("rejected:")}
    padded = total["padded_tokens"]
    return {
        "output": cfg.output,
        "fragments": len(fragments),
        "fragments_skipped": skipped,
        "rows_in": total["rows_in"],
        "rows": total["rows_out"],
        "chunks": total["chunks_out"],  # chunking: the rows written, one per chunk
        "unchanged": total["unchanged"],  # incremental runs: rows whose id and text the base already had
        "rejected": sum(rejects.values()),
        "rejected_by_reason": rejects,
        "truncated": total["truncated"],
        "tokens": total["tokens"],
        "padding_ratio": round(1 - total["tokens"] / padded, 4) if padded else 0.0,
        "wall_s": round(wall, 2),
        "run_rows": run["rows_out"],
        "store_retries": run["store_retries"],  # this run's fragments redone after store failures
        "docs_per_s": round(run["rows_out"] / wall, 1) if wall else 0.0,
        "tokens_per_s": round(run["tokens"] / wall, 1) if wall else 0.0,
    }
