"""cluster/ manifests agree with each other, the Dockerfile, pyproject and jobs/ (no cluster needed)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from rayembed.cli import parser, plan
from rayembed.config import EmbedConfig, ServeConfig
from rayembed.spec import build, load_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
IMAGE = "ghcr.io/rayembed/rayembed:0.1.0"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _find(obj: Any, key: str) -> list[Any]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _find(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _find(v, key)]
    return []


def _ray_pin() -> str:
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]


def test_kinds_present() -> None:
    kinds = {d["kind"] for p in KUBERAY for d in _docs(p)}
    assert kinds == {"RayCluster", "RayJob", "RayService", "ServiceAccount"}


def test_every_pod_gets_s3_credentials_and_a_memory_backed_dev_shm() -> None:
    """Head, workers and RayJob submitters run as the service account (IRSA / Pod Identity) and read the
    optional S3 Secret; every Ray pod mounts /dev/shm from a memory volume."""
    for path in KUBERAY:
        for doc in _docs(path):
            if doc["kind"] == "ServiceAccount":
                continue
            pods = _find(doc, "template") + _find(doc, "submitterPodTemplate")
            assert pods, path.name
            for pod in pods:
                spec = pod["spec"]
                assert spec["serviceAccountName"] == "rayembed", path.name
                for container in spec["containers"]:
                    assert {"secretRef": {"name": "rayembed-s3", "optional": True}} in container["envFrom"]
                if spec["containers"][0]["name"] != "ray-job-submitter":
                    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
                    volumes = {v["name"]: v for v in spec["volumes"]}
                    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}, path.name


def test_one_image_and_one_ray_version_everywhere() -> None:
    images = {img for p in KUBERAY for d in _docs(p) for img in _find(d, "image")}
    images.add(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())["docker"]["image"])
    assert images == {IMAGE}
    versions = {v for p in KUBERAY for d in _docs(p) for v in _find(d, "rayVersion")}
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG BASE=rayproject/ray:([\d.]+)-", dockerfile).group(1)  # type: ignore[union-attr]
    assert versions == {base} == {_ray_pin()}
    assert f"-t {IMAGE}" in dockerfile


def test_dockerfile_ships_package_and_specs() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert "torch==2.13.0" in text
    for line in (
        "COPY --chown=ray:users platform/ platform/",
        "COPY --chown=ray:users jobs/ jobs/",
        "COPY --chown=ray:users pyproject.toml",
    ):
        assert line in text


def test_rayjob_entrypoints_are_valid_commands() -> None:
    entrypoints = [d["spec"]["entrypoint"] for p in KUBERAY for d in _docs(p) if d["kind"] == "RayJob"]
    assert len(entrypoints) >= 2
    for ep in entrypoints:
        argv = shlex.split(ep)
        assert argv[0] == "rayembed", ep
        [spec_arg] = [a for a in argv if a.endswith(".yaml")]
        spec = ROOT / spec_arg
        assert spec_arg.startswith("jobs/") and spec.is_file(), ep
        planned = plan(parser().parse_args([str(spec) if a == spec_arg else a for a in argv[1:]]))
        if argv[1] == "run":  # --only names sections of the spec, run in its order
            only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else list(load_spec(spec))
            assert [job for job, _ in planned] == [j for j in load_spec(spec) if j in only], ep
        else:
            assert argv[1] in load_spec(spec), f"{ep}: {spec_arg} has no {argv[1]} section"
            assert [job for job, _ in planned] == [argv[1]]


def test_rayservice_matches_serve_app() -> None:
    [service] = [d for p in KUBERAY for d in _docs(p) if d["kind"] == "RayService"]
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    [app] = apps
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = build(ServeConfig, app["args"])
    assert cfg.max_replicas > cfg.min_replicas  # autoscaled
    embed_cfg = build(EmbedConfig, yaml.safe_load((ROOT / "jobs" / "embed.yaml").read_text())["embed"])
    assert cfg.dtype == (embed_cfg.gpu_dtype if cfg.num_gpus else embed_cfg.cpu_dtype)  # same vectors
    assert cfg.api_keys_file and any(
        m["mountPath"] == str(Path(cfg.api_keys_file).parent)
        for ms in _find(service, "volumeMounts")
        for m in ms
    )


def test_launcher_config() -> None:
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
