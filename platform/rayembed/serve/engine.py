"""The model side of the endpoint, free of HTTP: one Embedder, its token-budget batcher, and a request's
work — tokenize (or check token ids), embed through the batcher, finish (normalise, cut, quantise).

The ingress calls it in-process when it serves one model, or through a Serve deployment per model
(`ModelDeployment`: several models behind one endpoint, or a model that scales to zero). Every
response names the model's revision (a content hash of its weights), so a client can tell which of
two models answered during a rollout.

Every torch call of the engine, loading included, runs on one thread of its own (`compute`). PyTorch's
CPU kernels use GNU OpenMP, which keeps a pool of worker threads per calling thread; once a second
calling thread has a pool, the process holds more OpenMP threads than CPUs and libgomp stops letting idle
workers spin (100 spins instead of ~3 ms), so every small parallel region pays a futex wake-up: a
3-sentence MiniLM forward on this 2-core VM went from 7.5 to 13-14 ms (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rayembed.model import Embedder, Tokens, postprocess
from rayembed.model.chunking import encode_chunks
from rayembed.model.layout import ROLES, model_revision, resolve_model_path
from rayembed.model.remote import registered_revision
from rayembed.model.vectors import unit
from rayembed.serve.api import APIError, Job
from rayembed.serve.batcher import Overloaded, TokenBatcher
from rayembed.serve.config import ModelSpec, ServeConfig
from rayembed.serve.metrics import Metrics


@dataclass
class Embedded:
    vectors: np.ndarray
    tokens: int
    name: str
    revision: str
    chunks: dict[str, list[int]] | None = None  # chunked: doc, chunk, start, end, tokens per vector


class ModelEngine:
    def __init__(
        self, spec: ModelSpec, cfg: ServeConfig, metrics: Metrics | None = None, compute: Any = None
    ) -> None:
        # one model thread per process, a pair's two models included (see the module doc)
        self.compute = compute or ThreadPoolExecutor(1, thread_name_prefix="rayembed-model")
        path = resolve_model_path(spec.model, cfg.s3_endpoint_url)
        self.embedder = self.compute.submit(self._load, spec, path).result()
        self.embedder.tokenize_threads = max(1, int(spec.num_cpus or 1))
        self.name, self.revision, self.spec, self.cfg = (
            spec.name or self.embedder.name,
            registered_revision(path) or model_revision(path),  # a registry version names itself
            spec,
            cfg,
        )
        self.metrics = metrics or Metrics()
        self.batcher = TokenBatcher(
            self._encode, self.embedder.dim, cfg.max_batch_tokens, cfg.max_batch_inputs, cfg.batch_wait_timeout_s,
            cfg.max_queued_inputs, self.metrics.on_batch, self.compute,
        )  # fmt: skip
        self.documents = self._pair(spec, cfg) if spec.document_model else None

    def _pair(self, spec: ModelSpec, cfg: ServeConfig) -> ModelEngine:
        """The document encoder of an index-compatible pair, on this engine's model thread; refused unless
        both models record one frame (vectors of other frames do not score against each other)."""
        other = dataclasses.replace(spec, model=str(spec.document_model), document_model=None, name=self.name)
        documents = ModelEngine(other, cfg, self.metrics, self.compute)
        frames = (self.embedder.frame, documents.embedder.frame)
        if frames[0] is None or frames[0] != frames[1] or self.embedder.dim != documents.embedder.dim:
            raise ValueError(
                f"document_model {spec.document_model} (frame {frames[1]}, {documents.embedder.dim}-d) and model "
                f"{spec.model} (frame {frames[0]}, {self.embedder.dim}-d) are not one pair: a pair's models record "
                "one frame (a distillation's model and teacher-in-frame)"
            )
        return documents

    def routed(self, job: Job) -> tuple[ModelEngine, Job]:
        """The engine for a request and the prompt it gets: `input_type` (or, to a pair, a prompt_name of
        query or document) picks the pair's encoder, and that model's prompt of the name if it has one."""
        pair = self.documents is not None
        kind = job.input_type or (job.prompt_name if pair and job.prompt_name in ROLES else None)
        if kind is None:
            return self, job
        engine = self.documents if kind == "document" and self.documents is not None else self
        explicit = job.input_type is not None and job.prompt_name is not None
        prompt = job.prompt_name if explicit else kind if kind in engine.embedder.prompts else None
        return engine, dataclasses.replace(job, prompt_name=prompt, input_type=None)

    @staticmethod
    def _load(spec: ModelSpec, path: Any) -> Embedder:
        import torch

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        device = "cuda" if spec.num_gpus else "cpu"
        model = Embedder.load(path, device=device, dtype=getattr(torch, str(spec.dtype)))
        return model.set_reach(spec.max_length, spec.rope_scaling)

    def _encode(self, ids: list[list[int]], prompt_lengths: list[int] | None) -> np.ndarray:
        """Pooled vectors before normalising (each request normalises, or not, its own rows)."""
        c = self.cfg
        tokens = Tokens(ids, [], prompt_lengths)
        return self.embedder.encode(
            tokens, batch_size=c.max_batch_inputs, max_tokens=c.max_batch_tokens, normalize=False
        )

    def check_ids(self, ids: list[list[int]]) -> Tokens:
        """Token-id input: every id in the model's vocabulary; cut at max_length (marked truncated)."""
        vocab = len(self.embedder.tokenizer)
        for i, row in enumerate(ids):
            if not row:
                raise APIError(400, f"input[{i}] is an empty list of token ids", "input")
            if min(row) < 0 or max(row) >= vocab:
                raise APIError(
                    400, f"input[{i}]: token ids must be in [0, {vocab}), the model's own vocabulary", "input"
                )
        cut = self.embedder.max_length
        return Tokens([row[:cut] for row in ids], [len(row) > cut for row in ids])

    def check(self, job: Job) -> None:
        """What a request may ask of this model: a width it has, a prompt it knows."""
        dim = self.embedder.dim
        if job.dimensions is not None and job.dimensions > dim:
            raise APIError(400, f"dimensions must be <= {dim}", param="dimensions")
        if job.precision == "binary" and (job.dimensions or dim) % 8:
            raise APIError(400, "binary precision needs dimensions divisible by 8", param="dimensions")
        if job.prompt_name is not None and job.prompt_name not in self.embedder.prompts:
            known = sorted(self.embedder.prompts)
            raise APIError(
                400, f"unknown prompt_name {job.prompt_name!r}; known: {known}", param="prompt_name"
            )

    async def embed(self, job: Job) -> Embedded:
        """One request: its tokens, the model (alone if it is idle, else through the batcher), then this
        request's own finishing."""
        engine, job = self.routed(job)
        if engine is not self:
            return await engine.embed(job)
        self.check(job)
        if job.chunking is not None:
            return await self._chunked(job)
        try:
            if self._alone(job):  # one thread hop: tokenize and encode there
                tokens, raw = await self.batcher.alone(lambda: self._solo(job))
            else:
                tokens = await self._tokens(job)
                raw = await self.batcher.embed(tokens.ids, tokens.prompt_lengths)
        except Overloaded as e:
            raise APIError(429, f"server busy: {e}; retry later", code="overloaded") from None
        n = sum(len(x) for x in tokens.ids)
        self.metrics.inputs.inc(len(tokens.ids))
        self.metrics.tokens.inc(n)
        normalized = job.normalize and self.embedder.normalize
        vectors = postprocess(
            unit(raw) if normalized else raw,
            job.dimensions,
            job.precision,
            normalized,
            self.embedder.int8_scales,
        )
        return Embedded(vectors, n, self.name, self.revision)

    async def _chunked(self, job: Job) -> Embedded:
        """Chunked output of long inputs: the batch job's `chunking.encode_chunks`, alone on the model
        thread (late chunking needs the inputs' token states, which the batcher does not keep)."""
        c, texts = job.chunking, job.texts
        assert c is not None and texts is not None

        def work() -> tuple[Any, np.ndarray]:
            try:
                p, vectors, _ = encode_chunks(
                    self.embedder, texts, c.mode, c.chunk_tokens, c.overlap, c.boundary, job.dimensions,
                    job.precision, self.cfg.max_batch_inputs, self.cfg.max_batch_tokens, prompt_name=job.prompt_name,
                )  # fmt: skip
            except ValueError as e:  # a chunk size the model's window does not take, late on a cls model
                raise APIError(400, str(e), param="chunking") from None
            return p, vectors

        p, vectors = await self.batcher.alone(work)
        n = sum(map(len, p.ids))
        self.metrics.inputs.inc(len(texts))
        self.metrics.tokens.inc(n)
        chunks = {"doc": p.doc, "chunk": p.index, "start": p.start, "end": p.end, "tokens": p.tokens}
        return Embedded(vectors, n, self.name, self.revision, chunks)

    def _alone(self, job: Job) -> bool:
        """Take the model alone: it is idle and the request is no bigger than one batch (a big one goes
        through the batcher, which shares each model call fairly with requests arriving meanwhile)."""
        if job.texts is None or not self.batcher.idle:
            return False
        c = self.cfg
        return (
            len(job.texts) <= c.max_batch_inputs
            and len(job.texts) * self.embedder.max_length <= c.max_batch_tokens
        )

    def _checked(self, tokens: Tokens, job: Job) -> Tokens:
        if not job.truncate and any(tokens.truncated):
            i = tokens.truncated.index(True)
            raise APIError(
                400, f"input[{i}] is longer than {self.embedder.max_length} tokens", "input", "input_too_long"
            )
        return tokens

    async def _tokens(self, job: Job) -> Tokens:
        """The request's tokens: its ids checked, or its texts tokenized in a thread (a big request takes a while)."""
        if job.ids is not None:
            return self._checked(self.check_ids(job.ids), job)
        assert job.texts is not None
        return self._checked(
            await asyncio.to_thread(self.embedder.tokenize_ids, job.texts, job.prompt_name), job
        )

    def _solo(self, job: Job) -> tuple[Tokens, np.ndarray]:
        """A request alone on the model thread: tokenize, then encode."""
        assert job.texts is not None
        tokens = self._checked(self.embedder.tokenize_ids(job.texts, job.prompt_name), job)
        raw = self._encode(tokens.ids, tokens.prompt_lengths)
        self.metrics.on_batch(len(tokens.ids), sum(len(x) for x in tokens.ids))
        return tokens, raw

    def tokenize(
        self, texts: list[str], prompt_name: str | None, add_special_tokens: bool
    ) -> list[list[dict[str, Any]]]:
        """TEI's /tokenize: per text, its tokens with ids, text, whether special, and character offsets."""
        self.check(Job(prompt_name=prompt_name))
        tok = self.embedder.tokenizer
        prompt = self.embedder.prompt(prompt_name)
        special = set(tok.all_special_ids)
        out = []
        for text in texts:
            full = prompt + text
            enc = tok(full, add_special_tokens=add_special_tokens, truncation=True, max_length=self.embedder.max_length,
                      return_offsets_mapping=True)  # fmt: skip
            rows = []
            for token_id, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                is_special = token_id in special
                text_of = tok.convert_ids_to_tokens(token_id) if is_special else full[start:stop]
                rows.append({"id": token_id, "text": text_of, "special": is_special, "start": None if is_special else start,
                             "stop": None if is_special else stop})  # fmt: skip
            out.append(rows)
        return out

    def describe(self) -> dict[str, Any]:
        """What /v1/models and /info say of the model."""
        e = self.embedder
        return {"name": self.name, "revision": self.revision, "dim": e.dim, "pooling": e.pooling, "dtype": self.spec.dtype,
                "max_length": e.max_length, "rope_scaling": e.rope_scaling, "prompts": sorted(e.prompts),
                "queued_inputs": self.batcher.queued, "frame": e.frame,
                "document_revision": self.documents.revision if self.documents else None}  # fmt: skip
