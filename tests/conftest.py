"""Shared fixtures: a tiny random BERT built once per session, a local Ray cluster, and a real
S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from process_end import pytest_sessionfinish  # noqa: F401  # first: its atexit hook then runs last
from rayembed.config import SHARED_DATA

# Before Ray starts, so its workers inherit them: credentials for the loopback S3 server, and a quiet Ray.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default: a run's end (and a lost node) is seen up to
# 2 s late, twice a run. Polled every 0.25 s here, a 2-step run takes ~4.5 s less; nothing else changes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAYEMBED_MODEL_CACHE", tempfile.mkdtemp(prefix="rayembed-models-"))  # s3:// models

DATA = Path(SHARED_DATA)
ROOT = Path(__file__).resolve().parents[1]
MYPY = pytest.StashKey[tuple[Any, Path]]()


def start_mypy(config: pytest.Config, items: list[pytest.Item]) -> None:
    """mypy (tests/test_lint.py) needs one core for ~25 s and nothing from the other tests: it starts when
    the session knows it will run, at the lowest CPU priority (it takes what the Ray tests leave idle),
    and test_mypy waits for its verdict."""
    import subprocess
    import sys

    if any(item.nodeid == "tests/test_lint.py::test_mypy" for item in items):
        log = Path(tempfile.mkdtemp(prefix="rayembed-mypy-")) / "mypy.log"
        with log.open("w") as out:
            proc = subprocess.Popen(["nice", "-n", "19", str(Path(sys.executable).parent / "mypy")], cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        config.stash[MYPY] = (proc, log)


DISTILL_RECIPE = "tests/test_recipes.py::test_distill_recipe_runs_to_its_end"
BACKGROUND = pytest.StashKey[dict[str, Any]]()


def start_background_recipes(config: pytest.Config, items: list[pytest.Item]) -> None:
    """CI's distill recipe (test_recipes.py) is a `rayembed run` process with its own Ray cluster: when
    other tests share the session it starts now, at the lowest CPU priority, and runs in the ~30 % of the
    suite's time the Ray tests leave the 2 cores idle (waits, starts, polls) instead of ~2.5 min at the end;
    its test waits for it (finish_recipe), as does `ray stop` (test_ray_jobs.py), which stops every Ray
    process of the machine."""
    from recipes import CI_DISTILL, start_recipe

    config.stash[BACKGROUND] = {}
    if len(items) > 1 and any(item.nodeid == DISTILL_RECIPE for item in items):
        work = Path(tempfile.mkdtemp(prefix="rayembed-recipe-")) / "distill"
        # killed 50 min after the session's start if not done (a hang fails; starved, it takes ~10)
        config.stash[BACKGROUND]["distill"] = start_recipe("distill", work, 3000, CI_DISTILL, nice=True)


def background_recipes(config: pytest.Config) -> dict[str, Any]:
    """The recipes started with the session (name -> recipes.Started)."""
    return config.stash.get(BACKGROUND, {})


def pytest_unconfigure(config: pytest.Config) -> None:
    """A session that ends early (-x, ^C) takes its background recipe with it."""
    from recipes import kill_session

    for started in background_recipes(config).values():
        if started.proc.poll() is None:
            kill_session(started.proc)


def build_tiny(path: Path, seed: int = 0, name: str = "tiny-bert") -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved in the sentence-transformers layout."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rayembed.model import Embedder, default_model_path

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return Embedder(BertModel(cfg, add_pooling_layer=False), tok, max_length=64, name=name).save(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


def build_pair(teacher: Path, out: Path) -> tuple[Path, Path]:
    """An index-compatible pair as a distillation exports it (train/pair.py), without the training: the
    student is the teacher's second layer alone turned by a random rotation (pca_rotation's place), the
    teacher turned into its frame; (student folder, teacher-in-frame folder), roles marked."""
    import numpy as np

    from rayembed.model import Embedder
    from rayembed.model.layout import mark_role
    from rayembed.train.config import TrainConfig
    from rayembed.train.pair import teacher_in_frame

    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(32, 32)))[0]
    student = Embedder.load(teacher, device="cpu").keep_layers([1]).rotate(rotation)
    cfg = TrainConfig(data="x", output_dir="y", loss="distill", teacher=str(teacher), teacher_column="e")
    documents = teacher_in_frame(cfg, student, rotation)
    paths = (student.save(out / "student"), documents.save(out / "teacher-in-frame"))
    mark_role(paths[0], "query")
    mark_role(paths[1], "document")
    return paths


@pytest.fixture(scope="session")
def tiny_pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pair(tiny_model, tmp_path_factory.mktemp("pair"))


DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3")


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """tiny_decoder(family, **settings) -> path of a random 2-layer decoder (hidden 64) with a stand-in
    tokenizer, built once per session for each family and settings (rayembed.model.random_models)."""
    from rayembed.model.random_models import build_random_model

    root, built = tmp_path_factory.mktemp("decoders"), {}

    def get(family: str, **settings: Any) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in settings.items())))
        if key not in built:
            built[key] = build_random_model(family, root / f"{family}-{len(built)}", **settings)
        return built[key]

    return get


@pytest.fixture(scope="session")
def _ray_shutdown_at_end() -> Iterator[None]:
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_local(_ray_shutdown_at_end: None) -> None:
    """A local Ray cluster shared by the tests: 4 logical CPUs (2 train workers + Ray Data tasks).

    Started on first use; a test that needs another cluster (multi-node) shuts it down, and the next
    test that asks for this one starts it again.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


def _multi_node_cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A local multi-node Ray cluster (ray.cluster_utils.Cluster): a 1-CPU head and two 2-CPU worker
    nodes, each its own raylet; this test's driver is connected to it (the shared local cluster stops)."""
    yield from _multi_node_cluster()


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[Any]:
    """The same cluster, shared by the tests of one module (~8 s a start saved): a test that removes a
    node must be its module's last."""
    yield from _multi_node_cluster()


OWN_CLUSTER = {"cluster", "module_cluster", "ray_started", "recipe_dir"}


@pytest.hookimpl(trylast=True)  # after -k/-m deselect: what starts is what the session runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a test that starts its own Ray cluster run last (in their order), so the shared local
    cluster of `ray_local` starts once rather than again after each of them; mypy and the distill recipe
    start (start_mypy, start_background_recipes) unless the session only lists the tests."""
    if not config.option.collectonly:
        start_mypy(config, items)
        start_background_recipes(config, items)

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    own = {module(item) for item in items if OWN_CLUSTER & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: module(item) in own)


def record(figures: dict[str, Any], name: str = "figures") -> None:
    """Figures a test measured, kept where $RAYEMBED_FIGURES_DIR points (tests/bench/bench_reliability.py
    sets it and gathers them into docs/results/reliability.json); nothing otherwise."""
    import json

    folder = os.environ.get("RAYEMBED_FIGURES_DIR")
    if folder:
        path = Path(folder) / f"{name}-{os.getpid()}-{time.time_ns()}.json"
        path.write_text(json.dumps(figures, indent=1))


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll `cond` every 0.5 s until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


def free_port() -> int:
    """A bindable loopback port outside the OS ephemeral range (where Ray's many outgoing
    connections take their source ports, so a port picked there can be gone a moment later)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def start_endpoint(**settings: Any) -> str:
    """Deploy the Serve app on a free port (retrying on another port if the proxy cannot bind)."""
    from ray import serve

    from rayembed.config import ServeConfig
    from rayembed.serve import run

    for attempt in range(3):
        try:
            return run(ServeConfig(port=free_port(), **settings), blocking=False)
        except Exception:
            serve.shutdown()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _ranged_reads_cost_their_range() -> None:
    """moto (5.2) answers a ranged GET by reading the whole object from its spooled file, then slicing:
    pyarrow and Ray Train read checkpoints in ranges, so a 100 MB shard took 33 s to download (2.5 s to
    upload). The last few objects read are kept as bytes (dropped when rewritten), so a range costs its
    length; what the server stores and answers is unchanged."""
    import threading
    from collections import OrderedDict

    from moto.s3.models import FakeKey

    read, write = FakeKey.value.fget, FakeKey.value.fset
    recent: OrderedDict[int, tuple[Any, bytes]] = OrderedDict()  # the key is held: its id stays its own
    lock = threading.Lock()

    def value(key: Any) -> bytes:
        with lock:
            if id(key) not in recent:
                recent[id(key)] = (key, read(key))
                while len(recent) > 4:
                    recent.popitem(last=False)
            recent.move_to_end(id(key))
            return recent[id(key)][1]

    def set_value(key: Any, new: bytes) -> None:
        with lock:
            recent.pop(id(key), None)
            write(key, new)

    FakeKey.value = property(value, set_value)


class S3Faults:
    """WSGI middleware in front of the moto server: requests whose method is in `methods` and whose path
    matches the regex `path` fail with `status` (503 SlowDown: S3's throttling; 500 InternalError; 403
    AccessDenied, which no client retries) while
    `share` of them are drawn to fail (seeded), at most `limit` times. `failed` counts what it refused.
    Off until `set()` is called."""

    def __init__(self, app: Any) -> None:
        import threading

        self.app, self.lock = app, threading.Lock()
        self.set(share=0.0)

    def set(self, share: float, path: str = "", methods: tuple[str, ...] = ("PUT", "POST"),
            status: int = 503, limit: int | None = None, seed: int = 0) -> None:  # fmt: skip
        with self.lock:
            self.share, self.path, self.methods, self.status = share, path, methods, status
            self.limit, self.rng, self.failed = limit, random.Random(seed), 0

    def _fail_now(self, environ: dict[str, Any]) -> bool:
        with self.lock:
            hit = environ["REQUEST_METHOD"] in self.methods and re.search(
                self.path, environ.get("PATH_INFO", "")
            )
            if not hit or (self.limit is not None and self.failed >= self.limit):
                return False
            if self.rng.random() >= self.share:
                return False
            self.failed += 1
            return True

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self._fail_now(environ):
            return self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # drain the upload
        del body
        code = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied"}[self.status]
        xml = f"<Error><Code>{code}</Code><Message>injected by the test</Message></Error>".encode()
        start_response(f"{self.status} {code}", [("Content-Type", "application/xml"),
                                                  ("Content-Length", str(len(xml)))])  # fmt: skip
        return [xml]


@pytest.fixture(scope="session")
def _moto() -> Iterator[tuple[str, S3Faults]]:
    import boto3
    from moto.server import ThreadedMotoServer

    _ranged_reads_cost_their_range()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    faults = S3Faults(server._server.app)  # type: ignore[union-attr]
    server._server.app = faults  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="rayembed")
    yield url, faults
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(_moto: tuple[str, S3Faults]) -> str:
    """A moto S3 server on loopback with a bucket `rayembed`."""
    return _moto[0]


@pytest.fixture
def s3_faults(_moto: tuple[str, S3Faults]) -> Iterator[S3Faults]:
    """The loopback S3 server's fault switch (off again after the test)."""
    yield _moto[1]
    _moto[1].set(share=0.0)


@pytest.fixture(scope="session")
def snli_triples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real SNLI (premise, entailment, contradiction) triples as JSONL."""
    from rayembed.data.prepare import prepare

    path = tmp_path_factory.mktemp("data") / "snli.jsonl"
    prepare("snli", str(DATA / "snli-esnli"), str(path), split="dev", limit=200)
    return path


@pytest.fixture(scope="session")
def scifact_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 300 real SciFact documents (ids are strings)."""
    from rayembed.data.readers import read_jsonl, write_jsonl

    path = tmp_path_factory.mktemp("data") / "scifact300.jsonl"
    rows = read_jsonl(DATA / "scifact" / "corpus.jsonl")
    write_jsonl(path, (r for i, r in enumerate(rows) if i < 300))
    return path


def start_mlflow_server(
    root: Path, artifacts: str | None = None, env: dict[str, str] | None = None
) -> tuple[Any, str]:
    """A real `mlflow server` on loopback: SQLite backend store, artifacts served by it (proxied, as
    cluster workers reach them) from `artifacts` (default: a local folder; an s3:// URI with the server's
    `env` naming the store). (process, tracking URI) once /health answers."""
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", artifacts or str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None  # exited: stop waiting, fail below

    assert wait_for(up, 120) and proc.poll() is None, (root / "server.log").read_text()[-2000:]
    return proc, uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's MLflow tracking server and registry (tracking URI)."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    proc.terminate()
    proc.wait(30)
