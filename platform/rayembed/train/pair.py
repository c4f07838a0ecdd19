"""The index-compatible pair a distillation exports (LEAF, arXiv 2509.12539): the student learns the
teacher's vectors, so `teacher(document) . student(query)` scores in one space. The teacher embeds the
corpus offline (the batch job, once), the student answers queries online (the endpoint, fast); the pair's
asymmetric scores keep more of the teacher's quality than the student alone (docs/architecture.md
"The index-compatible pair").

The space is the student's output frame: with pca_rotation the student emits the teacher's vectors turned
by the run's rotation, so the teacher is turned alike (`Embedder.rotate`, through its Dense layer: a plain
sentence-transformers folder). Both folders record one `frame` (the teacher's frame after the turn, or
`native-<teacher revision>` when nothing was turned) and their `role` (query: the student; document: the
teacher), which the endpoint checks before it serves them as one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rayembed.model import Embedder
from rayembed.model.layout import model_revision, resolve_model_path
from rayembed.train.config import TrainConfig

PAIR_DIR = "teacher-in-frame"


def wants_pair(cfg: TrainConfig) -> bool:
    """A distillation whose teacher model is named (in the loop, or as the source of teacher_column)."""
    return cfg.loss == "distill" and bool(cfg.teacher) and cfg.export_pair


def teacher_path(cfg: TrainConfig) -> Path:
    return resolve_model_path(str(cfg.teacher), cfg.s3_endpoint_url)


def teacher_in_frame(cfg: TrainConfig, student: Embedder, rotation: Any) -> Embedder:
    """The run's teacher turned into the student's output frame; the student is given the same frame id
    (what it learned to emit is the teacher's vectors in that frame, whatever model it started from)."""
    path = teacher_path(cfg)
    teacher = Embedder.load(path, device=str(student.device))
    if teacher.dim != student.dim:
        raise ValueError(
            f"the teacher {cfg.teacher} is {teacher.dim}-d, the student {student.dim}-d: no pair"
        )
    if rotation is not None:
        teacher.rotate(rotation)
    teacher.frame = student.frame = teacher.frame or f"native-{model_revision(path)}"
    return teacher
