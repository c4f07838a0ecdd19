"""The cluster files' own commands against a real Ray cluster: `ray start --head` plus a worker node on
this machine (Ray 2.60 turns token auth on: clients set RAY_AUTH_MODE=token), the exact entrypoints of
cluster/kuberay/rayjob-*.yaml submitted through the Ray Jobs API with `s3://my-bucket` pointed at the
loopback S3 server and CPU-sized overrides appended (the LLM LoRA job: a tiny random Qwen3 for the model
folder, 2 CPU workers for 16 GPUs), then the RayService's serveConfigV2 deployed with `serve deploy`,
serving the LLM embedder the LoRA job wrote to S3, queried with its instruction prompt. The LLM job is
submitted with docs/deploy.md's own command and queried with its own examples (openai's extra_body, the TEI
route with curl): the walkthrough cannot drift from what runs."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DATA, background_recipes, free_port, wait_for
from rayembed.data.readers import write_jsonl
from rayembed.io import upload_dir
from rayembed.model import Embedder, resolve_model_path
from recipes import finish_recipe

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
BUCKET = "s3://rayembed/jobs"
SMALL = {  # CPU-sized overrides appended to each manifest's entrypoint (the spec's 1,000 ranking steps
    # take over a minute of the shared 2 cores here whatever pca_rows is: 10 still run that code path)
    "rayembed-train": "train.use_gpu=false train.batch_size=8 train.grad_cache_chunk=4 train.max_length=32 "
    "train.max_steps=2 train.checkpoint_every=2 train.warmup_steps=0 train.int8_calibration_texts=64 "
    "train.eval.max_queries=5 train.eval.max_docs=20",
    "rayembed-distill": "train.use_gpu=false train.batch_size=8 train.max_length=32 train.max_steps=2 "
    "train.checkpoint_every=2 train.pca_rows=64 train.pca_ranking_steps=10 train.int8_calibration_texts=64 "
    "train.eval.max_queries=5 train.eval.max_docs=20",
    "rayembed-embed": "",  # the spec as it is (the test uploads 32 documents)
    # 2 CPU workers instead of 16 GPUs, the tiny random Qwen3 for Qwen3-0.6B, 2 steps, a few eval queries
    "rayembed-llm-lora": "train.use_gpu=false train.num_workers=2 train.cpus_per_worker=1 train.precision=fp32 "
    "train.batch_size=8 train.grad_cache_chunk=4 train.max_length=32 train.max_steps=2 train.checkpoint_every=2 "
    "train.min_workers=null train.export_resources={} train.eval.max_queries=5 train.eval.max_docs=20 "
    "eval.max_queries=5 eval.max_docs=20",
}


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=180)  # fmt: skip


@pytest.fixture
def ray_started(s3_endpoint: str, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` and one worker node (the image's working folder is the repository here)."""
    import ray

    for started in background_recipes(request.config).values():  # `ray stop` stops every Ray process
        finish_recipe(started)
    ray.shutdown()  # the shared local cluster of other tests
    env = (
        os.environ
        | {
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "AWS_ENDPOINT_URL": s3_endpoint,  # every node's (the Secret's role in the pods, the profile's with EC2)
            "RAY_AUTH_MODE": "token",
            # the cluster's own token: a fresh machine has no ~/.ray/auth_token (an earlier ray.init writes one)
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # HAProxy's own listeners: an HAProxy orphaned by an earlier cluster may still hold the defaults
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        }
    )
    port, dashboard = free_port(), free_port()
    _ray("start", "--head", f"--port={port}", "--num-cpus=1", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--disable-usage-stats", env=env)  # fmt: skip
    before = _haproxies()
    try:
        _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=12", env=env)  # the four jobs side by side
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        ray_cli = str(Path(sys.executable).parent / "ray")
        # `ray stop` (SIGTERM) first: the raylets take their workers' children with them. `--force` alone
        # (SIGKILL) left Serve's HAProxy running, orphaned and holding the endpoint's port.
        subprocess.run([ray_cli, "stop"], env=env, capture_output=True, timeout=180)
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=180)
    left = _haproxies() - before
    assert wait_for(lambda: not _haproxies() & left, 30), f"Serve's HAProxy outlived the cluster: {left}"


def _haproxies() -> set[int]:
    """The HAProxy processes on this machine (Serve's ingress starts one per node)."""
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}


def _entrypoint(name: str) -> str:
    [job] = [d for d in yaml.safe_load_all((KUBERAY / f"rayjob-{name}.yaml").read_text()) if d]
    return f"{job['spec']['entrypoint'].replace('s3://my-bucket', BUCKET)} {SMALL[job['metadata']['name']]}".strip()


def _submit(address: str, env: dict[str, str], entrypoint: str, s3_endpoint: str) -> None:
    """`ray job submit`, as the RayJob's submitter pod runs it: it follows the job and fails with it."""
    runtime_env = json.dumps({"env_vars": {"AWS_ENDPOINT_URL": s3_endpoint}})
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--runtime-env-json", runtime_env, "--", *shlex.split(entrypoint)]  # fmt: skip
    _run_submit(cmd, env, entrypoint)


def doc_block(marker: str, lang: str) -> str:
    """The fenced `lang` block of docs/deploy.md that holds `marker` (the docs' own commands run here)."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if marker in b]
    assert len(blocks) == 1, f"docs/deploy.md: {len(blocks)} {lang} blocks hold {marker!r}"
    return blocks[0]


def _submit_as_documented(address: str, env: dict[str, str], tmp_path: Path) -> None:
    """docs/deploy.md's launcher command for the LLM LoRA job, as written, against this cluster: the
    manifest's bucket pointed at the test's, the head's address filled in, CPU-sized overrides appended."""
    manifest = tmp_path / "rayjob-llm-lora.yaml"
    manifest.write_text((KUBERAY / manifest.name).read_text().replace("s3://my-bucket", BUCKET))
    script = (
        doc_block("ENTRY=$(python", "bash")
        .replace("cluster/kuberay/rayjob-llm-lora.yaml", str(manifest))
        .replace("http://<head>:8265", address)
        .replace("python -c", f"{sys.executable} -c")
        .replace('-- $ENTRY"', f'-- $ENTRY {SMALL["rayembed-llm-lora"]}"')
    )
    assert str(manifest) in script and address in script and SMALL["rayembed-llm-lora"] in script
    _run_submit(["bash", "-c", script], env, "docs/deploy.md: the LLM LoRA job")


def _run_submit(cmd: list[str], env: dict[str, str], what: str) -> None:
    for _ in range(30):  # a fresh head's job agent can take a while to register ("try again later")
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, f"{what}\n{(done.stdout + done.stderr)[-4000:]}"
    assert "succeeded" in done.stdout + done.stderr


def test_manifest_jobs_and_service_on_a_started_cluster(
    ray_started: tuple[str, dict[str, str]],
    s3_endpoint: str,
    snli_triples: Path,
    scifact_docs: Path,
    tiny_decoder: Callable[..., Path],
    tmp_path: Path,
) -> None:
    import s3fs

    address, env = ray_started
    data = tmp_path / "train"
    data.mkdir()
    (data / "snli.jsonl").write_bytes(snli_triples.read_bytes())
    upload_dir(data, f"{BUCKET}/train", s3_endpoint)  # train/snli.jsonl, read by train
    texts = tmp_path / "texts"
    texts.mkdir()
    rows = [json.loads(line) for line in snli_triples.read_text().splitlines()[:64]]  # the pca_rows
    write_jsonl(texts / "texts.jsonl", ({"id": r["id"], "text": r["positive"]} for r in rows))
    upload_dir(texts, f"{BUCKET}/train/texts", s3_endpoint)  # id/text rows, read by distill's embed
    corpus = tmp_path / "corpus"  # 32 of the SciFact abstracts (_id/title/text), read by embed: on 2
    corpus.mkdir()  # cores shared with the other two jobs, each abstract costs the embed job ~0.5 s
    (corpus / "docs.jsonl").write_text("".join(scifact_docs.read_text().splitlines(keepends=True)[:32]))
    upload_dir(corpus, f"{BUCKET}/corpus", s3_endpoint)
    # eval/sts-test.csv first (an upload replaces its folder's contents), then the RayJobs' eval collection
    upload_dir(DATA / "stsbenchmark" / "stsbenchmark", f"{BUCKET}/eval", s3_endpoint)
    upload_dir(DATA / "scifact", f"{BUCKET}/eval/scifact", s3_endpoint)
    upload_dir(
        DATA / "flagembedding-examples", f"{BUCKET}/flagembedding", s3_endpoint
    )  # as FlagEmbedding ships them
    upload_dir(
        tiny_decoder("qwen3"), f"{BUCKET}/models/Qwen3-0.6B", s3_endpoint
    )  # its stand-in: a tiny random Qwen3
    names = ("train", "distill", "embed")
    with ThreadPoolExecutor(len(names) + 1) as pool:  # the RayJobs at once, as on a shared cluster
        jobs = [pool.submit(_submit, address, env, _entrypoint(name), s3_endpoint) for name in names]
        jobs.append(pool.submit(_submit_as_documented, address, env, tmp_path))  # the LLM job, as documented
        [job.result() for job in jobs]
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    outputs = fs.find("rayembed/jobs")
    report = json.loads(fs.cat(f"{BUCKET}/runs/train/report/report.json"))
    assert report["eval"]["after"]["beir"]["queries"] == 5  # the eval read its collection from S3
    for expected in ("runs/train/model/model.safetensors", "runs/train/report/report.json",
                     "distill/model/model.safetensors", "distill/teacher/_manifest.json", "embeddings/_manifest.json"):  # fmt: skip
        assert any(f.endswith(expected) for f in outputs), (expected, outputs)
    assert any("/checkpoints/minilm-snli/checkpoint_" in f for f in outputs)
    assert any("/checkpoints/llm-lora/checkpoint_" in f for f in outputs)
    llm_report = json.loads(fs.cat(f"{BUCKET}/runs/llm/report/report.json"))
    assert llm_report["run"]["step"] == 2 and llm_report["eval"]["after"]["beir"]["queries"] == 5
    llm_eval = json.loads(fs.cat(f"{BUCKET}/runs/llm/eval.json"))  # the eval section, data and report on S3
    assert llm_eval["beir"]["queries"] == 5 and llm_eval["sts"]["pairs"] == 1379

    # The LLM embedder the LoRA RayJob exported, served by the RayService's application: queries with the
    # model's `query` instruction through the openai client's extra_body, documents without.
    trained = f"{BUCKET}/runs/llm/model"
    url = _serve_deploy(address, env, trained, s3_endpoint, tmp_path)
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
    [served] = client.models.list().data
    assert served.id.endswith("-llm-lora")  # the trained model, named after its run
    local = Embedder.load(resolve_model_path(trained, s3_endpoint), device="cpu")
    text = ["which protein binds the receptor"]
    query = client.embeddings.create(input=text, model=served.id, encoding_format="float",
                                     extra_body={"prompt_name": "query"})  # fmt: skip
    np.testing.assert_allclose([query.data[0].embedding], local.encode(text, prompt_name="query"), atol=1e-5)
    doc = client.embeddings.create(input=text, model=served.id, encoding_format="float")
    np.testing.assert_allclose([doc.data[0].embedding], local.encode(text), atol=1e-5)
    assert not np.allclose(query.data[0].embedding, doc.data[0].embedding, atol=1e-3)
    # docs/deploy.md's own query examples: the openai client with extra_body, and the TEI route with curl
    scope: dict[str, object] = {"client": client, "name": served.id}
    exec(doc_block('extra_body={"prompt_name": "query"}', "python"), scope)
    asked = ["how do I reset my password"]
    expected = local.encode(asked, prompt_name="query")
    np.testing.assert_allclose([scope["q"].data[0].embedding], expected, atol=1e-5)  # type: ignore[attr-defined]
    curl = (
        doc_block("the TEI route", "bash").replace("http://127.0.0.1:8000", url).replace("<key>", "sk-test")
    )
    tei = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
    np.testing.assert_allclose(json.loads(tei.stdout), expected, atol=1e-5)


def _serve_deploy(address: str, env: dict[str, str], model: str, s3_endpoint: str, tmp_path: Path) -> str:
    """The RayService's serveConfigV2 with its model set to `model`, sized for CPU, via `serve deploy`."""
    [service] = [d for d in yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()) if d]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    keys = tmp_path / "api-keys"
    keys.write_text("sk-test\n")
    port = free_port()
    app = config["applications"][0]
    app["args"] |= {"model": model, "num_gpus": 0, "num_cpus": 1, "dtype": "float32", "port": port,
                    "api_keys_file": str(keys), "min_replicas": 1, "max_replicas": 1}  # fmt: skip
    app["runtime_env"] = {"env_vars": {"AWS_ENDPOINT_URL": s3_endpoint}}  # the Secret's role in Kubernetes
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address", address]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _healthy(url), 300), "the RayService's application never answered /healthz"
    return url


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            return bool(json.loads(r.read()).get("status") == "ok")
    except OSError:
        return False
