"""The `nightly` deployment really gets its runs: the server's scheduler service, end to end.

Against a real `prefect server start` (the `prefect_server` fixture, scheduler loop shortened
to 2 s), the server is prepared and prefect.yaml's `nightly` deployment deployed as an
operator does it; then the server's scheduler service must create Scheduled flow runs for it
at 02:00 Europe/Berlin (the next nights, per the server's defaults: 3 runs), within a bounded
wait, and its log must be free of `Can't evaluate bulk DML statement` (Prefect 3.8.8's
scheduler under SQLAlchemy 2.1 failed every loop with it and never created a run; 3.9's does
not, which is why pyproject.toml no longer bounds SQLAlchemy).

Why the runs can only come from the scheduler service: `prefect deploy` creates no flow runs
(the server's deployment upsert deletes the deployment's future auto-scheduled runs and
replaces its schedules, with new ids). Only the scheduler (or an explicit
`POST /deployments/{id}/schedule`, which no part of `prefect deploy` calls) writes runs with
`auto_scheduled`, a `created_by` of type SCHEDULE naming the schedule and a `scheduled ...`
idempotency key; the test accepts only such runs, created after the deploy started, for the
schedule ids the deployment has after the deploy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
BERLIN = ZoneInfo("Europe/Berlin")
DEPLOYMENT = "process-invoices/nightly"
BULK_DML_ERROR = "Can't evaluate bulk DML statement"
MIN_RUNS = 3  # the server's default PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS
SCHEDULER_WAIT = 30.0  # seconds; the fixture's scheduler loop is 2 s, recent deployments 5 s


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def nightly_starts(after: datetime, count: int) -> list[datetime | date]:
    """The next `count` nights' 02:00 Europe/Berlin strictly after `after`, in UTC; a night
    whose 02:00 does not exist (the spring-forward gap) is given as its date only."""
    day = after.astimezone(BERLIN).date()
    starts: list[datetime | date] = []
    while len(starts) < count:
        local = datetime(day.year, day.month, day.day, 2, 0, tzinfo=BERLIN)
        utc = local.astimezone(UTC)
        if utc.astimezone(BERLIN).replace(tzinfo=None) != local.replace(tzinfo=None):
            starts.append(day)  # 02:00 is skipped that night; any time that night will do
        elif utc > after:
            starts.append(utc)
        day += timedelta(days=1)
    return starts


def matches(actual: list[datetime], expected: list[datetime | date]) -> bool:
    if len(actual) != len(expected):
        return False
    return all(
        a.astimezone(BERLIN).date() == e
        if isinstance(e, date) and not isinstance(e, datetime)
        else a == e
        for a, e in zip(actual, expected, strict=False)
    )


def read_deployment(url: str) -> dict:
    response = httpx.get(f"{url}/deployments/name/{DEPLOYMENT}", timeout=30)
    response.raise_for_status()
    return response.json()


def flow_runs_of(url: str, deployment_id: str) -> list[dict]:
    response = httpx.post(
        f"{url}/flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200, "offset": 0},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def from_the_scheduler(run: dict, schedule_ids: set[str], deployment_id: str) -> bool:
    """A run the scheduler service wrote for one of these schedules of the deployment."""
    created_by = run.get("created_by") or {}
    return (
        run["auto_scheduled"] is True
        and created_by.get("type") == "SCHEDULE"
        and created_by.get("id") in schedule_ids
        and (run.get("idempotency_key") or "").startswith(f"scheduled {deployment_id} ")
        and "auto-scheduled" in run["tags"]
    )


def test_scheduler_service_creates_the_nightly_runs_at_two_in_berlin(prefect_server):
    env = dict(prefect_server.env)
    spec = next(
        d
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        if d["name"] == "nightly"
    )
    assert spec["schedules"] == [{"cron": "0 2 * * *", "timezone": "Europe/Berlin", "active": True}]

    prepare = run_cli([sys.executable, "-m", "deployments.prepare"], env)
    assert prepare.returncode == 0, output_of(prepare)
    deploy_started = datetime.now(UTC)
    deploy = run_cli([PREFECT, "--no-prompt", "deploy", "--name", "nightly"], env)
    assert deploy.returncode == 0, output_of(deploy)

    deployment = read_deployment(prefect_server.url)
    [schedule] = deployment["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"], schedule["active"]) == (
        "0 2 * * *",
        "Europe/Berlin",
        True,
    )
    schedule_ids = {schedule["id"]}

    # The scheduler service's loop (not the deploy) must create the runs; a failing loop
    # shows in the server's log at once.
    log_path = prefect_server.home / "server.log"
    deadline = time.monotonic() + SCHEDULER_WAIT
    while True:
        runs = [
            run
            for run in flow_runs_of(prefect_server.url, deployment["id"])
            if from_the_scheduler(run, schedule_ids, deployment["id"])
        ]
        log = log_path.read_text(errors="replace")
        if len(runs) >= MIN_RUNS or BULK_DML_ERROR in log or time.monotonic() > deadline:
            break
        time.sleep(1)
    found_at = datetime.now(UTC)
    assert len(runs) >= MIN_RUNS, (
        f"{len(runs)} scheduled runs for {DEPLOYMENT} by the scheduler service\n"
        f"--- server log\n{log[-3000:]}"
    )
    assert BULK_DML_ERROR not in log_path.read_text(errors="replace")

    assert all(
        run["state_type"] == "SCHEDULED" and run["state_name"] == "Scheduled" for run in runs
    )
    assert all(parse_time(run["created"]) >= deploy_started for run in runs)
    assert all(run["work_queue_name"] == "scheduled" for run in runs)
    assert all(run["parameters"]["source"] == spec["parameters"]["source"] for run in runs)
    starts = sorted(parse_time(run["expected_start_time"]) for run in runs)
    assert all(
        parse_time(run["next_scheduled_start_time"]) == parse_time(run["expected_start_time"])
        for run in runs
    )
    assert len(set(starts)) == len(starts) == MIN_RUNS, starts
    # The next three nights at 02:00 Berlin, from when the scheduler ran (between the deploy
    # and now: a 02:00 in that window shifts the first night by one).
    assert matches(starts, nightly_starts(deploy_started, MIN_RUNS)) or matches(
        starts, nightly_starts(found_at, MIN_RUNS)
    ), [s.astimezone(BERLIN).isoformat() for s in starts]
