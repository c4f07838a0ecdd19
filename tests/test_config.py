"""Job configs: YAML specs + key=value overrides, checked in __post_init__; every jobs/*.yaml parses."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from rayembed.cli import parser, plan
from rayembed.config import CONFIGS, JOBS, EmbedConfig, TrainConfig
from rayembed.spec import build, load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_there_is_a_spec_per_job() -> None:
    sections = {job for path in SPECS for job in load_spec(path)}
    assert sections == set(JOBS)
    assert {"smoke.yaml", "train.yaml", "distill.yaml", "embed.yaml", "serve.yaml", "eval.yaml"} <= {
        p.name for p in SPECS
    }


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_builds(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # specs use paths relative to the repo root, as the README runs them
    planned = plan(parser().parse_args(["run", str(path)]))
    assert [job for job, _ in planned] == list(load_spec(path))  # sections run in the spec's order
    produced = set()
    for job, cfg in planned:
        assert isinstance(cfg, CONFIGS[job])
        if job == "prepare":
            assert cfg.kind == "random_model" or Path(cfg.source).is_dir(), cfg.source
            produced.add(str(Path(cfg.output).resolve()))
        if job == "mine":
            assert str(Path(cfg.pairs).resolve()) in produced or Path(cfg.pairs).exists(), cfg.pairs
            produced.add(str(Path(cfg.output, "mined.jsonl").resolve()))
        if job == "train":  # data and model come from the spec's prepare step or exist already
            assert cfg.data in produced or Path(cfg.data).exists(), cfg.data
            model = cfg.model if cfg.model == "default" else str(Path(cfg.model).resolve())
            assert model == "default" or model in produced or Path(model).exists(), cfg.model
        if job == "eval":
            assert cfg.beir_dir is None or Path(cfg.beir_dir).is_dir()
            assert cfg.sts_file is None or Path(cfg.sts_file).is_file()
        if job == "embed" and "://" not in cfg.input:  # from an earlier section, or there already
            assert str(Path(cfg.input).resolve()) in produced or Path(cfg.input).exists(), cfg.input
            produced.add(str(Path(cfg.output).resolve()))


def test_overrides_are_yaml_values() -> None:
    spec = load_spec(
        ROOT / "jobs" / "smoke.yaml", ["train.max_steps=3", "train.matryoshka_dims=[64, 32]", "eval.dims=[]"]
    )
    cfg = build(TrainConfig, spec["train"])
    assert cfg.max_steps == 3 and cfg.matryoshka_dims == [64, 32]
    assert load_spec(None, ["dim=128", "precision=int8"], job="embed")["embed"] == {
        "dim": 128,
        "precision": "int8",
    }


def test_cli_flags_mix_with_overrides() -> None:
    args = parser().parse_args(
        ["embed", "--model", "default", "--input", "in.jsonl", "--output", "out", "dim=64"]
    )
    [(job, cfg)] = plan(args)
    assert job == "embed" and isinstance(cfg, EmbedConfig)
    assert cfg.dim == 64 and cfg.input.endswith("in.jsonl") and Path(cfg.input).is_absolute()


@pytest.mark.parametrize(
    ("job", "values", "message"),
    [
        ("train", {"data": "x", "output_dir": "y", "bogus": 1}, r"unknown setting\(s\) \['bogus'\]"),
        ("train", {"output_dir": "y"}, "missing 1 required positional argument: 'data'"),
        ("train", {"data": "x", "output_dir": "y", "loss": "distill"}, "needs a teacher"),
        ("train", {"data": "x", "output_dir": "y", "precision": "fp16"}, "fp16 needs use_gpu"),
        ("train", {"data": "x", "output_dir": "y", "forward_tokens": 0}, "forward_tokens must be >= 1"),
        ("embed", {"input": "x", "output": "y", "precision": "fp8"}, "precision must be"),
        ("serve", {"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ("serve", {"dtype": "float16"}, "float16 with num_gpus > 0"),
        ("serve", {"look_back_period_s": 10.0}, "must exceed the 10.0 s at which Ray Serve's replicas push"),
        ("embed", {"input": "x", "output": "y", "cpu_dtype": "float16"}, "cpu_dtype must be"),
        (
            "embed",
            {"input": "x", "output": "y", "chunking": "late", "title_column": "t"},
            "pass the title through",
        ),
        ("embed", {"input": "x", "output": "y", "chunk_boundary": "page"}, "chunk_boundary must be"),
        ("prepare", {"kind": "csv", "source": "x", "output": "y"}, "kind must be"),
        (
            "prepare",
            {"kind": "random_model", "family": "gpt9", "output": "y"},
            "random_model needs family in",
        ),
        ("prepare", {"kind": "snli", "output": "y"}, "needs a source folder"),
        ("train", {"data": "x", "output_dir": "y", "attention": "sideways"}, "attention must be one of"),
        (
            "train",
            {"data": "x", "output_dir": "y", "placement_strategy": "ANYWHERE"},
            "placement_strategy must be one of",
        ),
        ("train", {"data": "x", "output_dir": "y", "offload": "optimizer"}, "it needs use_gpu=true"),
        (
            "train",
            {"data": "x", "output_dir": "y", "offload": "disk"},
            "offload must be one of optimizer, all or null",
        ),
        (
            "train",
            {"data": "x", "output_dir": "y", "precision": "fp8"},
            "precision must be one of fp32, bf16, fp16",
        ),
        (
            "train",
            {"data": "x", "output_dir": "y", "export_resources": {"gpus": 1}},
            "export_resources takes",
        ),
        (
            "train",
            {"data": "x", "output_dir": "y", "data_format": "flagembedding", "loss": "hard_infonce"},
            "trains with loss=infonce",
        ),  # fmt: skip
    ],
)
def test_bad_settings_are_refused(job: str, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(CONFIGS[job], values)


def test_no_ray_future_warning_from_the_platforms_own_serve_configs() -> None:
    """Every autoscaling config the platform builds (the shipped spec, the RayService's, the tests') passes
    Ray's own validation without a FutureWarning (Ray 2.60 warns, and will refuse, a look-back window not
    above its 10 s metrics interval)."""
    import warnings

    import yaml
    from ray.serve.config import AutoscalingConfig

    from rayembed.serve.deployment import _autoscaling

    root = Path(__file__).resolve().parents[1]
    service = yaml.safe_load((root / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    configs = [load_spec(str(root / "jobs" / "serve.yaml"))["serve"], args, {"look_back_period_s": 11}]
    for settings in configs:
        cfg = build(CONFIGS["serve"], settings)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            AutoscalingConfig(**_autoscaling(cfg, cfg.specs()[0]))
    with pytest.raises(ValueError, match="look_back_period_s \\(2.0\\) must exceed the 10.0 s"):
        build(CONFIGS["serve"], {"look_back_period_s": 2.0})
    with pytest.warns(FutureWarning, match="look_back_period_s"):  # what the check keeps users from
        AutoscalingConfig(look_back_period_s=2.0)


def test_bad_override_syntax() -> None:
    with pytest.raises(ValueError, match="not key=value"):
        load_spec(None, ["max_steps"], job="train")
    with pytest.raises(ValueError, match="prefix it with a job name"):
        load_spec(None, ["max_steps=3"])


def test_every_field_is_documented() -> None:
    for cls in CONFIGS.values():
        source = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            after = source.split(f"\n    {f.name}:", 1)[1].split("\n", 2)[1].strip()
            assert after.startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


def test_zero_working_sets_and_worker_allocator_follow_the_config() -> None:
    from rayembed.train.config import TrainConfig
    from rayembed.train.job import worker_env
    from rayembed.train.loop import deepspeed_config

    base = {"data": "x", "output_dir": "y"}
    zero3 = deepspeed_config(TrainConfig(**base, zero_stage=3, zero_bucket_size=2_000_000))[
        "zero_optimization"
    ]
    assert zero3["stage"] == 3 and zero3["sub_group_size"] == zero3["stage3_max_live_parameters"] == 2_000_000
    zero2 = deepspeed_config(TrainConfig(**base, zero_stage=2))["zero_optimization"]
    assert zero2["reduce_bucket_size"] == 50_000_000 and "sub_group_size" not in zero2
    assert deepspeed_config(TrainConfig(**base, zero_stage=0))["zero_optimization"] == {"stage": 0}
    assert worker_env(TrainConfig(**base)) == {"MALLOC_MMAP_THRESHOLD_": "65536"}
    assert worker_env(TrainConfig(**base, malloc_mmap_threshold=None)) == {}
    with pytest.raises(ValueError, match="zero_bucket_size must be >= 1e6"):
        TrainConfig(**base, zero_bucket_size=10)


def test_overrides_reach_settings_inside_settings() -> None:
    """`train.eval.max_queries=50` sets one key of train's eval section (the rest as the spec has it); a
    one-job command takes `eval.max_queries=50` as its own eval's; a plain setting has no keys inside."""
    spec = str(Path(__file__).resolve().parents[1] / "jobs" / "distill.yaml")
    got = load_spec(spec, ["train.eval.max_queries=50", "eval.max_docs=300"])
    assert got["train"]["eval"]["max_queries"] == 50 and got["train"]["eval"]["max_docs"] == 1000
    assert got["eval"]["max_docs"] == 300  # the spec's own eval section
    one_job = load_spec(spec, ["eval.max_queries=5", "max_steps=3"], job="train")
    assert one_job["train"]["eval"]["max_queries"] == 5 and one_job["train"]["max_steps"] == 3
    assert load_spec(None, ["merge.eval.max_docs=9"]) == {"merge": {"eval": {"max_docs": 9}}}
    with pytest.raises(ValueError, match="train.lr holds no settings of its own"):
        load_spec(spec, ["train.lr.x=1"])


def test_a_distillation_for_a_corpus_checks_its_retention_on_that_corpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`prepare.corpus=PATH` on jobs/distill.yaml (the corpus recipe) gives the train section's eval the same
    corpus, so the run reports the label-free retention estimate on the documents it was distilled for;
    an eval that names its own corpus (or null) keeps it, and a train section without a teacher gets none."""
    monkeypatch.chdir(ROOT)
    spec, docs = str(ROOT / "jobs" / "distill.yaml"), "${RAYEMBED_DATA}/scifact/corpus.jsonl"
    monkeypatch.setenv("RAYEMBED_DATA", "/data")
    got = dict(plan(parser().parse_args(["run", spec, f"prepare.corpus={docs}"])))
    assert got["prepare"].corpus == got["train"].eval["corpus"] == "/data/scifact/corpus.jsonl"
    assert "corpus" not in load_spec(spec)["train"]["eval"]  # no corpus given: no check
    own = load_spec(spec, ["prepare.corpus=a.jsonl", "train.eval.corpus=null"])
    assert own["train"]["eval"]["corpus"] is None
    assert "corpus" not in load_spec(spec, ["prepare.corpus=a.jsonl", "train.teacher=null"])["train"]["eval"]
    # The rotation is fitted on the corpus's rows: prepare's source column passed through embed to train.
    assert got["train"].pca_source == "corpus" and got["embed"].passthrough_columns == ["text", "source"]
    plain = load_spec(spec)  # no corpus: as shipped, no source column asked of the texts (a user's own)
    assert "pca_source" not in plain["train"] and plain["embed"]["passthrough_columns"] == ["text"]
    opted_out = load_spec(spec, ["prepare.corpus=a.jsonl", "train.pca_source=null"])
    assert opted_out["train"]["pca_source"] is None and opted_out["embed"]["passthrough_columns"] == ["text"]
    elsewhere = load_spec(spec, ["prepare.corpus=a.jsonl", "embed.input=my-texts.jsonl"])
    assert "pca_source" not in elsewhere["train"]  # embed reads other rows: they carry no prepare source
