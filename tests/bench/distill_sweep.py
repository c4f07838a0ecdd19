"""Recipe sweep for distillation that generalizes: one variant per call, single process, plain torch.

    .venv/bin/python tests/bench/distill_sweep.py NAME [--steps 250] [--token-weight 0] [--layers 0,2,5] ...

Same math as `rayembed train loss=distill` (AdamW with linear warm-up, gradient clipping 1.0, the
`EmbeddingDistill` loss over Matryoshka widths, spread-out, pca_rotation), without Ray and DeepSpeed so
that variants are cheap to compare. The teacher's pooled vectors of the general mix are computed once
into the work folder. Scored on **dev** collections only (SNLI-dev retrieval, SciFact train queries),
so that choosing a recipe never looks at the test collections bench_quality.py reports.
Appends one JSON line per variant to <workdir>/sweep.jsonl and rewrites docs/results/distill-sweep.json
from all of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_quality import scores
from results import header

from rayembed.config import SHARED_DATA, EvalConfig
from rayembed.data.mix import general_texts, nli_retrieval
from rayembed.data.readers import load_beir
from rayembed.model import Embedder
from rayembed.model.batching import by_length
from rayembed.model.pca import principal_axes, ranking_axes
from rayembed.train.losses import EmbeddingDistill, matryoshka
from rayembed.train.regularizers import SpreadOut

DIMS = [384, 256, 128, 64]
PREFIX_FULL_BELOW = 256  # --prefix-full-weight: the widths below this (128, 64) get the full-width target
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "distill-sweep.json"


def dev_sets(work: Path) -> dict[str, EvalConfig]:
    nli_retrieval(Path(SHARED_DATA) / "snli-esnli", work / "snli-dev", "dev")
    common = {"dims": [128], "precisions": ["float32", "int8"], "sts_file": None}
    return {
        "snli_dev": EvalConfig(beir_dir=str(work / "snli-dev"), max_queries=1000, **common),  # type: ignore[arg-type]
        "scifact_train": EvalConfig(beir_dir=f"{SHARED_DATA}/scifact", split="train", **common),  # type: ignore[arg-type]
    }


class NoSelfPairs(EmbeddingDistill):
    """The relational term over each row's similarities to the *other* rows (the diagonal, 1 for teacher
    and student alike, takes almost all the softmax mass at temperature 0.05)."""

    def relational(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1)
        eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
        ss = (s @ s.T / self.temperature).masked_fill(eye, -1e4)
        tt = (t @ t.T / self.temperature).masked_fill(eye, -1e4)
        return F.kl_div(F.log_softmax(ss, dim=-1), F.softmax(tt, dim=-1), reduction="batchmean")


def cross_pairs(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(T T^T / tau) || softmax(S T^T / tau)): each student row ranks the teacher's rows of the
    batch as the teacher's own row does, which is what the pair's score (student query . teacher document)
    asks of it."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1)
    log_p_s = F.log_softmax(s @ t.T / temperature, dim=-1)
    return F.kl_div(log_p_s, F.softmax(t @ t.T / temperature, dim=-1), reduction="batchmean")


def token_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of 1 - cos(student token state, teacher token state)."""
    cos = F.cosine_similarity(student, teacher.detach(), dim=-1)
    m = mask.to(cos.dtype)
    return ((1 - cos) * m).sum() / m.sum()


def random_word_texts(tokenizer: object, n: int, rng: np.random.Generator) -> list[str]:
    """n texts of 4-16 words drawn uniformly from the tokenizer's whole-word, alphabetic vocabulary."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3)  # type: ignore[attr-defined]
    return [" ".join(rng.choice(vocab, int(rng.integers(4, 17)))) for _ in range(n)]


def augment(texts: list[str], rng: np.random.Generator) -> list[str]:
    """Per text: a crop (5-25 consecutive words) and that crop with one edit (delete, swap, replace by a
    word of another text, negate), placed in the same batch so the relational term sees fine distinctions."""
    words = [t.split() for t in texts]
    pool = [w for ws in words for w in ws]
    crops, edits = [], []
    for ws in words:
        n = int(min(len(ws), rng.integers(5, 26)))
        start = int(rng.integers(0, len(ws) - n + 1))
        crop = ws[start : start + n]
        edit = list(crop)
        op, i = rng.integers(4), int(rng.integers(len(edit)))
        if op == 0 and len(edit) > 1:
            del edit[i]
        elif op == 1 and len(edit) > 1:
            j = min(i + 1, len(edit) - 1) if i + 1 < len(edit) else i - 1
            edit[i], edit[j] = edit[j], edit[i]
        elif op == 2:
            edit[i] = pool[int(rng.integers(len(pool)))]
        else:
            aux = [
                k
                for k, w in enumerate(edit)
                if w.lower() in {"is", "are", "was", "were", "can", "will", "does", "did"}
            ]
            if "not" in edit:
                edit.remove("not")
            elif aux:
                edit.insert(aux[0] + 1, "not")
            else:
                edit.insert(0, "no")
        crops.append(" ".join(crop))
        edits.append(" ".join(edit))
    return crops + edits


def batch_order(vectors: np.ndarray, batch: int, neighbors: float, steps: int) -> list[np.ndarray]:
    """Row indices of each step: shuffled epochs; with `neighbors` > 0 that fraction of every batch is
    one k-means cluster (of about that many rows) of the teacher's vectors, the rest random rows."""
    rng, n = np.random.default_rng(0), len(vectors)
    k = int(round(batch * neighbors))
    if not k:
        flat = np.concatenate([rng.permutation(n) for _ in range(steps * batch // n + 1)])
        return [flat[i * batch : (i + 1) * batch] for i in range(steps)]
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    centres = x[rng.choice(n, n // k, replace=False)]
    for _ in range(10):  # spherical k-means
        assign = (x @ centres.T).argmax(1)
        for c in range(len(centres)):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(0) / np.linalg.norm(members.mean(0))
    groups = [g for c in range(len(centres)) if len(g := rng.permutation(np.flatnonzero(assign == c))) >= 2]
    out = []
    for _ in range(steps):
        g = groups[rng.integers(len(groups))]
        near = g[:k]
        rest = rng.choice(np.setdiff1d(np.arange(n), near), batch - len(near), replace=False)
        out.append(np.concatenate([near, rest]))
    return out


class WeightAverage:
    """Uniform average of the model's weights after every `every`-th step of the last `last` steps: what
    merging (`rayembed merge`) that run's checkpoints would give."""

    def __init__(self, model: torch.nn.Module, steps: int, last: int, every: int) -> None:
        self.model, self.first, self.every = model, steps - last, every
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, step: int) -> None:
        if step + 1 <= self.first or (step + 1) % self.every:
            return
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                self.sums[name] = self.sums.get(name, 0) + value.detach().clone()
        self.count += 1

    def averaged(self) -> torch.nn.Module:
        model = copy.deepcopy(self.model)
        model.load_state_dict({k: v / self.count for k, v in self.sums.items()}, strict=False)
        return model


def record(work: Path, result: dict[str, Any]) -> None:
    """Append one variant to <work>/sweep.jsonl and rewrite docs/results/distill-sweep.json from it; a new
    workdir starts from the runs already in that file, so they are kept."""
    print(json.dumps(result))
    if not (work / "sweep.jsonl").exists() and RESULTS.exists():
        earlier = json.loads(RESULTS.read_text())["runs"]
        (work / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    with open(work / "sweep.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    runs = [json.loads(line) for line in (work / "sweep.jsonl").read_text().splitlines()]
    out = {
        **header(),
        "command": "python tests/bench/distill_sweep.py NAME [options] (one call per variant: runs[*].args)",
        "collections": "dev only: snli_dev = SNLI-dev retrieval (1,000 queries), scifact_train = SciFact train queries",
        "metric": "nDCG@10 at 384 and 128 dims, float32 and int8",
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layers", default="0,2,5")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--no-self-pairs", action="store_true", help="relational KL without each row's own pair")
    ap.add_argument(
        "--prefix-full-weight", type=float, default=0.0,
        help="weight of a relational KL between each prefix's (128, 64) similarities and the teacher's full-width ones",
    )  # fmt: skip
    ap.add_argument("--prefix-full-temperature", type=float, default=0.1)
    ap.add_argument(
        "--whiten-weight", type=float, default=0.0,
        help="weight of a squared error between unit student and teacher vectors, each principal axis "
        "divided by the teacher's spread along it (every axis counts alike, not by its variance)",
    )  # fmt: skip
    ap.add_argument("--token-weight", type=float, default=0.0, help="last-layer token states")
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="every student layer's token states")
    ap.add_argument("--freeze-embeddings", action="store_true", help="token/position embeddings not trained")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--dropout", type=float, default=None, help="the student's dropout (default: the model's)"
    )
    ap.add_argument("--spread-weight", type=float, default=0.1, help="spread-out regulariser weight")
    ap.add_argument(
        "--matryoshka-weights",
        default="",
        help="weights of widths 384,256,128,64 (default 1 each), e.g. 1,1,2,1",
    )
    ap.add_argument("--decay", action="store_true", help="lr decays linearly to 0 after the warm-up")
    ap.add_argument(
        "--average-last",
        type=int,
        default=0,
        help="also score the average of the weights over this many last steps",
    )
    ap.add_argument("--forward-tokens", type=int, default=4096, help="length-sorted chunks (0: one pass)")
    ap.add_argument("--sentences", type=int, default=6000, help="Wikipedia sentences in the general mix")
    ap.add_argument("--random-words", type=int, default=0, help="texts of random vocabulary words added")
    ap.add_argument(
        "--corpus-text",
        action="store_true",
        help="add the SNLI-dev corpus (its hypotheses, never its queries or labels) to the training text",
    )
    ap.add_argument("--extra-text", default="", help="a JSONL file whose `text` rows join the training text")
    ap.add_argument(
        "--augment", type=int, default=0, help="rows per batch that add a crop and an edited crop"
    )
    ap.add_argument(
        "--neighbor-batches",
        type=float,
        default=0.0,
        help="fraction of each batch drawn from one k-means cluster of the teacher's vectors",
    )
    ap.add_argument("--eval-every", type=int, default=0, help="SNLI-dev nDCG@10 every this many steps")
    ap.add_argument("--eval-teacher", action="store_true")
    ap.add_argument(
        "--eval-teacher-pca", action="store_true",
        help="score the teacher rotated by the principal axes of its vectors of the training text (no training)",
    )  # fmt: skip
    ap.add_argument(
        "--ranking-steps", type=int, default=0, help="pca axes turned by rayembed.model.pca.ranking_axes"
    )
    ap.add_argument("--ranking-temperature", type=float, default=0.1)
    ap.add_argument(
        "--cross-weight",
        type=float,
        default=0.0,
        help="cross_pairs at each width (their mean), the pair's score",
    )
    ap.add_argument("--pair", action="store_true", help="also score student queries vs teacher-in-frame docs")
    ap.add_argument("--workdir", default="/tmp/sweep")
    return ap.parse_args()


def training_text(args: argparse.Namespace, work: Path, teacher: Embedder) -> tuple[list[str], np.ndarray]:
    """The general mix (plus --random-words texts, plus --corpus-text's documents) and the teacher's
    vectors of it, each part's vectors cached in `work`."""

    def vectors_of(texts: list[str], name: str) -> np.ndarray:
        file = work / f"{name}.npy"
        if not file.exists():
            np.save(file, teacher.encode(texts, batch_size=64))
        return np.load(file)

    mix = [r["text"] for r in general_texts(SHARED_DATA, args.sentences)]
    parts = [(mix, "teacher" if args.sentences == 6000 else f"teacher-s{args.sentences}")]
    if args.random_words:
        rng = np.random.default_rng(2)
        parts.append(
            (
                random_word_texts(teacher.tokenizer, args.random_words, rng),
                f"teacher-random{args.random_words}",
            )
        )
    if args.extra_text:
        seen = {t for texts, _ in parts for t in texts}
        lines = Path(args.extra_text).read_text().splitlines()
        extra = sorted({json.loads(line)["text"] for line in lines} - seen)
        parts.append((extra, f"teacher-{Path(args.extra_text).stem}"))
    if args.corpus_text:  # unlabeled text of the target domain: what a user has of their own corpus
        corpus, _, _ = load_beir(str(work / "snli-dev"))
        seen = {t for texts, _ in parts for t in texts}
        parts.append((sorted(set(corpus.values()) - seen), "teacher-snli-dev-corpus"))
    texts = [t for part, _ in parts for t in part]
    return texts, np.concatenate([vectors_of(part, name) for part, name in parts])


class Step:
    """One variant's loss of a batch: pooled alignment + relational (Matryoshka), spread-out, and the
    optional terms: prefixes against full width, whitened error, token states against the teacher run on
    the same tokens."""

    def __init__(
        self,
        args: argparse.Namespace,
        student: Embedder,
        teacher: Embedder,
        axes: np.ndarray,
        spread_per_axis: torch.Tensor,
    ) -> None:
        self.args, self.student, self.teacher = args, student, teacher
        self.axes = torch.as_tensor(axes)
        self.spread_per_axis = spread_per_axis  # --whiten-weight: the unit targets' std per axis
        self.teacher_layer = [m + 1 for m in map(int, args.layers.split(","))]  # student layer i -> h[m + 1]
        cls = NoSelfPairs if args.no_self_pairs else EmbeddingDistill
        self.loss_fn, self.spread = cls("cosine", args.kl_weight, args.temperature), SpreadOut()
        self.prefix_kl = NoSelfPairs("cosine", 1.0, args.prefix_full_temperature)
        self.rng = np.random.default_rng(1)

    def token_terms(self, out: Any, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token-state terms of one chunk, summed over its real tokens."""
        a, mask = self.args, feats["attention_mask"]
        with torch.no_grad():
            t_out = self.teacher.backbone(**feats, output_hidden_states=True)
        total = a.token_weight * token_loss(out.last_hidden_state, t_out.last_hidden_state, mask)
        if a.hidden_weight:
            per = [token_loss(out.hidden_states[i + 1], t_out.hidden_states[j], mask)
                   for i, j in enumerate(self.teacher_layer)]  # fmt: skip
            total = total + a.hidden_weight * sum(per) / len(per)
        return total * mask.sum()

    def __call__(self, texts: list[str], target: torch.Tensor) -> torch.Tensor:
        a = self.args
        if a.augment:
            extra = augment(texts[: a.augment], self.rng)
            with torch.no_grad():
                extra_t = (
                    by_length(lambda f: self.teacher(**f), self.teacher.tokenize(extra), 4096) @ self.axes
                )
            texts, target = texts + extra, torch.cat([target, extra_t])
        feats = self.student.tokenize(texts)
        terms: list[torch.Tensor] = []

        def forward(f: dict[str, torch.Tensor]) -> torch.Tensor:
            out = self.student.backbone(**f, output_hidden_states=bool(a.hidden_weight))
            if a.token_weight or a.hidden_weight:
                terms.append(self.token_terms(out, f))
            return self.student._pool(out.last_hidden_state, f["attention_mask"], False)

        emb = by_length(forward, feats, a.forward_tokens)
        weights = [float(w) for w in a.matryoshka_weights.split(",")] if a.matryoshka_weights else None
        loss = matryoshka(self.loss_fn, DIMS, weights, emb, target) + a.spread_weight * self.spread(emb, emb)
        # the short prefixes ranked as the teacher's full width ranks, not as its PCA prefix
        if a.prefix_full_weight:
            loss = loss + a.prefix_full_weight * sum(
                self.prefix_kl.relational(emb[:, :k], target) for k in DIMS if k < PREFIX_FULL_BELOW
            )
        if a.cross_weight:
            loss = loss + a.cross_weight * sum(
                cross_pairs(emb[:, :k], target[:, :k], a.temperature) for k in DIMS
            ) / len(DIMS)
        if a.whiten_weight:
            diff = (F.normalize(emb, dim=-1) - F.normalize(target, dim=-1)) / self.spread_per_axis
            loss = loss + a.whiten_weight * diff.pow(2).mean()
        return loss + sum(terms) / feats["attention_mask"].sum() if terms else loss


def main() -> None:
    args = parse()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    teacher = Embedder.load("default", device="cpu")
    evals = dev_sets(work)
    if args.eval_teacher:
        record(work, {"name": "teacher", "scores": scores(teacher, evals)})
        return
    texts, vectors = training_text(args, work, teacher)
    axes = (
        ranking_axes(vectors, [d for d in DIMS if d < DIMS[0]], args.ranking_temperature, args.ranking_steps)
        if args.ranking_steps
        else principal_axes(vectors)
    )
    if args.eval_teacher_pca:  # the student's target: what its prefixes can at best imitate
        record(work, {"name": args.name, "args": vars(args), "scores": scores(teacher.rotate(axes), evals)})
        return
    targets = torch.as_tensor(vectors @ axes)
    student = Embedder.load("default", device="cpu").keep_layers([int(x) for x in args.layers.split(",")])
    student.rotate(axes).train()
    student.max_length = teacher.max_length = args.max_length
    if args.freeze_embeddings:
        student.backbone.get_input_embeddings().weight.requires_grad_(False)
        for p in student.backbone.embeddings.parameters():
            p.requires_grad_(False)
    step_loss = Step(args, student, teacher, axes, F.normalize(targets, dim=-1).std(0))
    opt = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01
    )
    if args.dropout is not None:
        for m in student.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = args.dropout
    decay = (lambda s: max(0.0, (args.steps - s) / (args.steps - 10))) if args.decay else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10, decay(s)))
    order = batch_order(vectors, args.batch_size, args.neighbor_batches, args.steps)
    average = WeightAverage(student, args.steps, args.average_last, 10) if args.average_last else None
    t0, history, curve = time.perf_counter(), [], []
    for step, idx in enumerate(order):
        loss = step_loss([texts[i] for i in idx], targets[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(round(float(loss.detach()), 4))
        if average:
            average.update(step)
        if step % 10 == 0:
            print(step, history[-1], round(time.perf_counter() - t0), flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            curve.append({"step": step + 1, **scores(student.eval(), {"snli_dev": evals["snli_dev"]})})
            print(curve[-1], flush=True)
            student.train()
    seconds = round(time.perf_counter() - t0)
    # --pair: the student's queries also against the teacher-in-frame's documents (the index-compatible pair)
    documents = copy.deepcopy(teacher).rotate(axes) if args.pair else None
    got = scores(student.eval(), evals, documents)
    result = {"name": args.name, "args": vars(args), "train_s": seconds, "loss_every_50": history[::50] + history[-1:],
              "scores": got, "curve": curve}  # fmt: skip
    if args.pair:
        result["pair_scores"] = got.pop("pair")
    if average:
        result["scores_averaged"] = scores(average.averaged().eval(), evals)  # type: ignore[arg-type]
    record(work, result)


if __name__ == "__main__":
    main()
