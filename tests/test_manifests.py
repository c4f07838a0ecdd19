"""Every deployment file validates as a strict client would check it: cluster/kuberay/*.yaml against the
KubeRay v1.7.0 CRDs' OpenAPI schemas (../shared/kuberay-crds/; unknown fields are errors, as with
`kubectl --validate=strict`), and cluster/ray-cluster.yaml against the launcher schema in the ray wheel."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
CRDS = DATA.parent / "kuberay-crds"
MANIFESTS = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def strict(schema: Any) -> Any:
    """A Kubernetes structural schema as JSON Schema: objects with declared properties refuse others
    (unless marked x-kubernetes-preserve-unknown-fields), int-or-string takes either."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict schema, from the CRD files (parsed once)."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return out


def errors(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    schema = schemas[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


class UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML loaders keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = {k for k in keys if keys.count(k) > 1}
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys given twice: {sorted(twice)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def custom_resources() -> list[tuple[str, dict[str, Any]]]:
    docs = [(p.name, d) for p in MANIFESTS for d in yaml.load_all(p.read_text(), Loader=UniqueKeys) if d]
    return [(name, d) for name, d in docs if d["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize(
    ("name", "doc"), custom_resources(), ids=lambda x: x if isinstance(x, str) else x["kind"]
)
def test_kuberay_manifests_validate_strictly(name: str, doc: dict[str, Any]) -> None:
    assert errors(doc, crd_schemas()) == [], name


def test_strict_validation_catches_an_unknown_field_and_a_wrong_type() -> None:
    schemas = crd_schemas()
    _, doc = next((n, d) for n, d in custom_resources() if d["kind"] == "RayJob")
    typo = copy.deepcopy(doc)
    typo["spec"]["entrypont"] = typo["spec"].pop("entrypoint")
    assert any("entrypont" in e for e in errors(typo, schemas))
    wrong = copy.deepcopy(doc)
    wrong["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = (
        "lots"
    )
    assert errors(wrong, schemas)


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="keys given twice"):
        yaml.load("a:\n  b: 1\n  b: 2\n", Loader=UniqueKeys)


def test_launcher_yaml_validates_against_the_ray_wheels_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.load((ROOT / "cluster" / "ray-cluster.yaml").read_text(), Loader=UniqueKeys)
    jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config | {"max_workerz": 3}, schema)
