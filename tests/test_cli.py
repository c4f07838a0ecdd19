"""The `rayembed` command line: jobs from specs and flags, clear errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA
from rayembed.cli import main


def test_prepare_from_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snli.jsonl"
    assert main(["prepare", "kind=snli", f"source={DATA / 'snli-esnli'}", f"output={out}", "limit=5"]) == 0
    assert json.loads(capsys.readouterr().out)["prepare"]["rows"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"id", "query", "positive", "negative"}


def test_beir_prepare_uses_qrels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pairs.jsonl"
    argv = ["prepare", "kind=beir", f"source={DATA / 'scifact'}", f"output={out}", "split=train"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["prepare"]["rows"] == len(out.read_text().splitlines()) > 500


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "--model", "/no/such/model", "--input", "in.jsonl", "--output", "o"], "not found"),
        (["train", "data=x", "output_dir=y", "bogus=1"], "unknown setting"),
        (["run", "jobs/does-not-exist.yaml"], "No such file"),
        (["prepare", "kind=csv", "source=x", "output=y"], "kind must be"),
        (["eval", "beir_dir=null", "sts_file=null"], "needs beir_dir, sts_file or corpus"),
    ],
)
def test_errors_exit_2_with_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rayembed {argv[0]}: error:") and message in err


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "rayembed"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for job in ("prepare", "train", "eval", "embed", "serve", "run"):
        assert job in out


def test_run_only_some_sections_in_spec_order() -> None:
    from rayembed.cli import parser, plan

    spec = str(Path(__file__).parents[1] / "jobs" / "distill.yaml")
    planned = plan(parser().parse_args(["run", "--only", "train,embed", spec]))
    assert [job for job, _ in planned] == ["embed", "train"]  # the spec's order, not --only's
    with pytest.raises(ValueError, match="the spec's sections are"):
        plan(parser().parse_args(["run", "--only", "serve", spec]))


def test_overrides_may_follow_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """`rayembed run SPEC --only train key=value` and `embed SPEC --model M dim=128`: argparse alone refused
    the overrides after the flag ("unrecognized arguments")."""
    from rayembed.cli import parse, plan

    spec = str(Path(__file__).parents[1] / "jobs" / "distill.yaml")
    args = parse(["run", spec, "--only", "train", "train.max_steps=30", "train.lr=0.001"])
    assert args.only == "train" and args.overrides == ["train.max_steps=30", "train.lr=0.001"]
    [(job, cfg)] = plan(args)
    assert job == "train" and cfg.max_steps == 30 and cfg.lr == 0.001
    args = parse(["embed", "jobs/embed.yaml", "--model", "m", "dim=128", "--input", "i", "precision=int8"])
    assert (args.spec, args.model, args.input) == ("jobs/embed.yaml", "m", "i")
    assert args.overrides == ["dim=128", "precision=int8"]
    args = parse(["embed", "--model", "m", "dim=128", "--input", "i", "precision=int8"])  # no spec
    assert [args.spec, *args.overrides] == ["dim=128", "precision=int8"]
    for stray in (
        ["run", spec, "--only", "train", "oops"],
        ["run", spec, "--bogus"],
        ["compact", "a", "b", "x=1"],
    ):
        with pytest.raises(SystemExit) as exit_:
            parse(stray)
        assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_a_multi_section_run_sizes_one_local_cluster_for_its_biggest_section() -> None:
    """embed before train (distill, mine) must not start Ray with too few CPUs for training's reads."""
    from rayembed.cli import cluster_cpus, parser, plan

    jobs = Path(__file__).parents[1] / "jobs"
    distill = plan(parser().parse_args(["run", str(jobs / "distill.yaml"), "train.num_workers=3"]))
    assert [j for j, _ in distill][1:3] == ["embed", "train"]
    assert cluster_cpus(distill) == 3 * 1.0 + 2  # train's workers + 2 read slots, though embed runs first
    mine = plan(parser().parse_args(["run", str(jobs / "mine.yaml")]))
    assert cluster_cpus(mine) == 2 * 1.0 + 2
    assert (
        cluster_cpus(plan(parser().parse_args(["run", "--only", "embed", str(jobs / "distill.yaml")])))
        is None
    )


@pytest.mark.parametrize("job", ["prepare", "train", "merge", "mine", "eval", "embed", "serve"])
def test_help_lists_every_setting_with_its_default_and_docstring(
    job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    from rayembed.config import CONFIGS
    from rayembed.settings import field_docs

    with pytest.raises(SystemExit):
        main([job, "--help"])
    out = capsys.readouterr().out
    docs = field_docs(CONFIGS[job])
    for f in dataclasses.fields(CONFIGS[job]):
        assert docs.get(f.name), f"{job}.{f.name} has no docstring"
        assert f"\n  {f.name} (default: " in out, f.name
        assert " ".join(docs[f.name].split())[:40] in " ".join(out.split()), f.name


def test_docs_and_specs_name_only_settings_that_exist() -> None:
    """`section.key=` (and `train.eval.key=`) anywhere, and `key=` on a `rayembed <job>` command line, in the
    README, docs/, jobs/ and cluster/: every key is a setting of that job (a renamed option cannot linger in
    the docs)."""
    import dataclasses
    import re

    from rayembed.config import CONFIGS

    root = Path(__file__).resolve().parents[1]
    fields = {j: {f.name for f in dataclasses.fields(c)} for j, c in CONFIGS.items()}
    jobs = "|".join(CONFIGS)
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "jobs").glob("*.yaml"),
             *(root / "cluster").rglob("*.yaml")]  # fmt: skip
    unknown, named = [], 0
    for path in files:
        text = path.read_text()
        for m in re.finditer(rf"(?<![\w/.-])({jobs})\.([a-z][a-z0-9_]*)\s*=", text):
            named += 1
            if m.group(2) not in fields[m.group(1)]:
                unknown.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"(?<![\w/.-])(train|merge)\.eval\.([a-z][a-z0-9_]*)\s*=", text):
            named += 1  # a run's eval section holds eval settings
            if m.group(2) not in fields["eval"]:
                unknown.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(rf"rayembed ({jobs})\b([^\n#]*)", text):
            for key in re.findall(r"(?<![\w.-])([a-z][a-z0-9_]*)=", m.group(2)):
                named += 1
                if key not in fields[m.group(1)]:
                    unknown.append(f"{path.name}: rayembed {m.group(1)} ... {key}=")
    assert named > 50 and not unknown, unknown
