"""Operating the flow the Prefect way, end to end against a real `prefect server start`.

The server preparation command, `prefect deploy --all` from the project root, a `process`
worker, and `prefect deployment run ... --watch` over invoices in a moto S3 bucket (one run
with credentials from an AwsCredentials block, one with the default chain and the endpoint
in the run's job variables); the exit code, the final state, the bucket and the artifacts
are checked. Also: the scheduled deployment's cron on the server, `deployments.serve`, and
the CI example's command against prefect.yaml.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

from tests.conftest import on_server, stop_process

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
SAMPLES = ROOT / "samples" / "invoices"
AWS_BLOCK = "invoices-test-aws"
# How a run names a block parameter (`prefect deployment run --param`, prefect.yaml, the API).
AWS_BLOCK_REF = {"$ref": {"block_document_slug": f"aws-credentials/{AWS_BLOCK}"}}
# The block's secret key (moto takes any): it must never show in output, logs or artifacts.
BLOCK_SECRET = f"blocksecret{uuid.uuid4().hex}"
WATCH_TIMEOUT = 150


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def artifacts_of(prefect_server, flow_run_id) -> dict[str, dict]:
    """The flow run's artifacts by key, as the REST API gives them (flow-level ones too)."""
    response = httpx.post(
        f"{prefect_server.url}/artifacts/filter",
        json={
            "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}},
            "limit": 100,
            "offset": 0,
        },
        timeout=30,
    )
    response.raise_for_status()
    return {artifact["key"]: artifact for artifact in response.json()}


def table_rows(artifact: dict) -> list[dict]:
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


@pytest.fixture(scope="module")
def client_env(prefect_server) -> dict[str, str]:
    """A CLI's environment: the server's, no S3 endpoint (each run says where S3 is)."""
    env = dict(prefect_server.env)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def deployed(prefect_server, moto_endpoint, client_env) -> dict[str, str]:
    """The server prepared (with an AwsCredentials block for moto) and prefect.yaml deployed."""
    prepare = run_cli(
        [sys.executable, "-m", "deployments.prepare", "--aws-credentials-block", AWS_BLOCK],
        {
            **client_env,
            "AWS_ENDPOINT_URL": moto_endpoint,
            "AWS_ACCESS_KEY_ID": "blockkeyid",
            "AWS_SECRET_ACCESS_KEY": BLOCK_SECRET,
        },
    )
    assert prepare.returncode == 0, output_of(prepare)
    assert f"AwsCredentials block {AWS_BLOCK!r}: saved" in prepare.stdout
    assert BLOCK_SECRET not in prepare.stdout + prepare.stderr
    deploy = run_cli([PREFECT, "--no-prompt", "deploy", "--all"], client_env)
    hint = ""
    if "workers/filter" in deploy.stdout + deploy.stderr:
        hint = (
            "\n(fastapi>=0.151 validates the explicit nulls Prefect's client sends; "
            "its server needs fastapi<0.151)"
        )
    assert deploy.returncode == 0, output_of(deploy) + hint
    return client_env


@pytest.fixture(scope="module")
def worker(deployed, tmp_path_factory):
    """`prefect worker start` on the on-demand queue, polling every second, with JSON logs
    (the flow-run processes it starts inherit its environment)."""
    home = tmp_path_factory.mktemp("worker")  # not the project: the pull step must find it
    log_path = home / "worker.log"
    env = {
        **deployed,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_SETTINGS_PATH": str(ROOT / "deployments" / "logging.yml"),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                PREFECT,
                "worker",
                "start",
                "--pool",
                "invoices",
                "--work-queue",
                "on-demand",
                "--type",
                "process",
            ],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    yield log_path
    stop_process(proc)


def put_invoices(moto_endpoint: str, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def read_json(moto_endpoint: str, bucket: str, key: str) -> dict:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def trigger(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, uuid.UUID]:
    proc = run_cli(
        [
            PREFECT,
            "deployment",
            "run",
            "process-invoices/on-demand",
            "--watch",
            "--watch-timeout",
            str(WATCH_TIMEOUT),
            *args,
        ],
        env,
        timeout=WATCH_TIMEOUT + 60,
    )
    found = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert found, output_of(proc)
    return proc, uuid.UUID(found.group(1))


async def flow_run_logs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    return await client.read_logs(
        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
        limit=200,
        offset=0,
        sort=LogSort.TIMESTAMP_ASC,
    )


def sample_files(*names: str) -> dict[str, bytes]:
    return {name: (SAMPLES / name).read_bytes() for name in names}


def test_prepare_is_idempotent_and_sets_up_pool_queues_and_limits(deployed, prefect_server):
    again = run_cli([sys.executable, "-m", "deployments.prepare"], deployed)
    assert again.returncode == 0, output_of(again)
    assert "work pool 'invoices' (type process): exists" in again.stdout
    # The nightly deployment's blocks (prefect.yaml) are named, and how to make them.
    assert (
        "deployment 'nightly' uses the aws-credentials block 'invoices-aws' (aws_credentials), "
        "which does not exist: create it with `--aws-credentials-block invoices-aws`"
    ) in again.stdout
    assert "the secret block 'openai-api-key'" in again.stdout

    async def check(client):
        pool = await client.read_work_pool("invoices")
        queues = {
            name: await client.read_work_queue_by_name(name, work_pool_name="invoices")
            for name in ("on-demand", "scheduled")
        }
        limits = {
            name: await client.read_global_concurrency_limit_by_name(name)
            for name in ("llm-in-flight", "llm-rate")
        }
        return pool, queues, limits

    pool, queues, limits = on_server(prefect_server, check)
    assert pool.type == "process"
    assert queues["on-demand"].priority < queues["scheduled"].priority
    assert limits["llm-in-flight"].active and limits["llm-rate"].slot_decay_per_second > 0


def test_scheduled_deployment_carries_its_cron_schedule(deployed, prefect_server):
    spec = next(
        d
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        if d["name"] == "nightly"
    )
    nightly = on_server(
        prefect_server, lambda c: c.read_deployment_by_name("process-invoices/nightly")
    )
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [
        (spec["schedules"][0]["cron"], spec["schedules"][0]["timezone"], True)
    ]
    assert nightly.work_pool_name == "invoices" and nightly.work_queue_name == "scheduled"
    assert nightly.parameters["aws_credentials"] == {
        "$ref": {"block_document_slug": "aws-credentials/invoices-aws"}
    }
    assert nightly.parameters["source"].startswith("s3://")


def test_on_demand_deployment_has_a_usable_run_form(deployed, prefect_server):
    on_demand = on_server(
        prefect_server, lambda c: c.read_deployment_by_name("process-invoices/on-demand")
    )
    assert on_demand.schedules == []
    assert on_demand.work_pool_name == "invoices" and on_demand.work_queue_name == "on-demand"
    properties = on_demand.parameter_openapi_schema["properties"]
    for name in (
        "source",
        "output",
        "extractor",
        "max_concurrency",
        "invoice_timeout",
        "max_attempts",
        "fail_on_invoice_errors",
        "aws_credentials",
        "openai_api_key",
    ):
        assert properties[name].get("description"), name
    # Credentials are blocks: the form shows a block picker of the right type.
    definitions = on_demand.parameter_openapi_schema["definitions"]
    for name, slug in (("aws_credentials", "aws-credentials"), ("openai_api_key", "secret")):
        [ref] = [kind["$ref"] for kind in properties[name]["anyOf"] if "$ref" in kind]
        assert definitions[ref.rsplit("/", 1)[1]]["block_type_slug"] == slug
        assert name in on_demand.parameters, name
    # Where the code is comes from the clone that deployed, not from a path written in a file.
    [step] = on_demand.pull_steps
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert Path(directory).resolve() == ROOT


def test_the_run_form_carries_the_bounds_and_the_server_refuses_a_bad_value(
    deployed, prefect_server
):
    """The bounds of the flow's signature reach the deployment's form, and a run asked for
    with a value out of them (the UI form, `prefect deployment run --param`) is refused
    before it is created, so it never takes claims or starts work."""
    on_demand = on_server(
        prefect_server, lambda c: c.read_deployment_by_name("process-invoices/on-demand")
    )
    properties = on_demand.parameter_openapi_schema["properties"]
    assert properties["max_concurrency"]["minimum"] == 1
    assert properties["chunk_size"]["minimum"] == 1
    assert properties["invoice_timeout"]["minimum"] == 1
    assert properties["stop_grace_seconds"]["minimum"] == 0
    with pytest.raises(Exception) as refused:
        on_server(
            prefect_server,
            lambda c: c.create_flow_run_from_deployment(
                on_demand.id, parameters={"max_concurrency": 0}
            ),
        )
    assert "max_concurrency" in str(refused.value) or "greater" in str(refused.value)


def test_a_block_chosen_in_the_run_form_is_accepted(deployed, prefect_server):
    """What the UI's block picker sends for a credentials parameter: a reference by id.
    (Prefect checks it against the block's schema or a reference, exactly one of the two;
    an `AwsCredentials` schema left open to any object matched both and was refused.)"""

    async def create_and_delete(client):
        # Read, not loaded: loading a block emits an event, which would start this process's
        # events worker against this server, where later in-process tests' events do not go.
        block_id = (
            await client.read_block_document_by_name(AWS_BLOCK, block_type_slug="aws-credentials")
        ).id
        deployment = await client.read_deployment_by_name("process-invoices/on-demand")
        run = await client.create_flow_run_from_deployment(
            deployment.id,
            work_queue_name="nobody-polls-this",
            parameters={"aws_credentials": {"$ref": {"block_document_id": str(block_id)}}},
        )
        await client.delete_flow_run(run.id)
        return run

    run = on_server(prefect_server, create_and_delete)
    assert run.parameters["aws_credentials"]["$ref"]["block_document_id"]


def test_on_demand_run_over_s3_with_an_aws_credentials_block(
    worker, deployed, prefect_server, moto_endpoint, s3_bucket
):
    names = [
        "invoice-0001-classic.pdf",
        "invoice-0002-modern.pdf",
        "invoice-0004-compact-total-mismatch.pdf",
    ]
    put_invoices(moto_endpoint, s3_bucket, "incoming", sample_files(*names))
    # The worker has no S3 endpoint in its environment: the block is the only way to moto.
    proc, flow_run_id = trigger(
        deployed,
        "--param",
        f"source=s3://{s3_bucket}/incoming",
        "--param",
        f"output=s3://{s3_bucket}/processed",
        "--param",
        "extractor=offline",
        "--param",
        "aws_credentials=" + json.dumps(AWS_BLOCK_REF),
    )
    assert proc.returncode == 0, output_of(proc) + "\n--- worker\n" + worker.read_text()[-4000:]
    assert "Flow run finished successfully in 'Completed'" in proc.stdout

    flow_run = on_server(prefect_server, lambda c: c.read_flow_run(flow_run_id))
    assert flow_run.state.is_completed(), flow_run.state

    manifest = read_json(moto_endpoint, s3_bucket, "processed/manifest.json")
    entries = manifest["entries"]
    assert set(entries) == set(names)
    assert {entries[n]["status"] for n in names} <= {"done", "needs_review"}
    assert entries["invoice-0004-compact-total-mismatch.pdf"]["status"] == "needs_review"
    for name in names:
        assert entries[name]["flow_run_id"] == str(flow_run_id)
        result = read_json(moto_endpoint, s3_bucket, f"processed/{entries[name]['result_key']}")
        assert result["key"] == name and result["invoice"]["total"] is not None

    artifacts = artifacts_of(prefect_server, flow_run_id)
    progress = artifacts["invoice-run-progress"]
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    assert progress["description"] == "3 of 3 invoices recorded"
    summary = artifacts["invoice-run-summary"]
    assert summary["type"] == "table"
    assert {row["invoice"] for row in table_rows(summary)} == set(names)
    report = artifacts["invoice-run-report"]
    assert report["type"] == "markdown" and "3 processed" in report["data"]

    # The pipeline's own records, as JSON lines from the flow-run process and in the API.
    lines = [json.loads(line) for line in worker.read_text().splitlines() if line.startswith("{")]
    ours = [
        line
        for line in lines
        if line.get("invoice_key") and line["flow_run_id"] == str(flow_run_id)
    ]
    assert {line["invoice_key"] for line in ours} == set(names)
    assert all(line["task_run_id"] and line["duration_s"] >= 0 for line in ours)
    logs = on_server(prefect_server, lambda c: flow_run_logs(c, flow_run_id))
    assert {log.task_run_id for log in logs if any(n in log.message for n in names)} >= {
        uuid.UUID(line["task_run_id"]) for line in ours
    }

    # Nothing secret in the run's parameters, logs (API, worker, --watch) or artifacts.
    seen = "\n".join(
        [proc.stdout, proc.stderr, worker.read_text(), json.dumps(flow_run.parameters)]
        + [log.message for log in logs]
        + [json.dumps(a) for a in artifacts.values()]
    )
    assert BLOCK_SECRET not in seen


def test_a_failed_invoice_fails_the_watch_after_everything_is_recorded(
    worker, deployed, prefect_server, moto_endpoint, s3_bucket
):
    files = sample_files("invoice-0003-german.pdf", "invoice-0005-french.pdf")
    files["broken.pdf"] = b"this is not a pdf at all\n" * 10
    put_invoices(moto_endpoint, s3_bucket, "incoming", files)
    # Default AWS chain on the worker (its environment has the keys); the endpoint comes with
    # this run's job variables, merged into the flow-run process's environment.
    proc, flow_run_id = trigger(
        deployed,
        "--param",
        f"source=s3://{s3_bucket}/incoming",
        "--param",
        f"output=s3://{s3_bucket}/processed",
        "--param",
        "extractor=offline",
        "--job-variable",
        "env=" + json.dumps({"AWS_ENDPOINT_URL": moto_endpoint}),
    )
    assert proc.returncode == 1, output_of(proc) + "\n--- worker\n" + worker.read_text()[-4000:]
    watched = proc.stdout + proc.stderr
    assert "Flow run finished in state 'Failed'" in watched
    # --watch streams the run's logs: the failed invoice and the run's outcome are in them.
    assert re.search(r"broken\.pdf failed in [\d.]+ s: not_a_pdf", watched), watched[-3000:]
    assert "1 of 3 failed: not_a_pdf 1" in watched

    flow_run = on_server(prefect_server, lambda c: c.read_flow_run(flow_run_id))
    assert flow_run.state.is_failed() and flow_run.state.message == "1 of 3 failed: not_a_pdf 1"

    entries = read_json(moto_endpoint, s3_bucket, "processed/manifest.json")["entries"]
    assert entries["broken.pdf"]["status"] == "failed" and entries["broken.pdf"]["error_code"]
    assert {entries[n]["status"] for n in files if n != "broken.pdf"} <= {"done", "needs_review"}

    artifacts = artifacts_of(prefect_server, flow_run_id)
    assert float(artifacts["invoice-run-progress"]["data"]) == 100.0
    rows = {row["invoice"]: row for row in table_rows(artifacts["invoice-run-summary"])}
    assert rows["broken.pdf"]["status"] == "failed" and rows["broken.pdf"]["reason"]
    assert "broken.pdf" in artifacts["invoice-run-report"]["data"]


def test_serve_runs_the_deployments_without_a_worker(deployed, prefect_server, tmp_path):
    env = {**deployed, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serving = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve", "--only", "on-demand", "--suffix=-served"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        source = tmp_path / "in"
        source.mkdir()
        (source / "invoice-0006-dutch.pdf").write_bytes(
            (SAMPLES / "invoice-0006-dutch.pdf").read_bytes()
        )
        deadline = time.monotonic() + 60
        while "being served" not in log_path.read_text():
            assert serving.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        proc = run_cli(
            [
                PREFECT,
                "deployment",
                "run",
                "process-invoices/on-demand-served",
                "--watch",
                "--watch-timeout",
                str(WATCH_TIMEOUT),
                "--param",
                f"source={source}",
                "--param",
                f"output={tmp_path / 'out'}",
                "--param",
                "extractor=offline",
            ],
            env,
            timeout=WATCH_TIMEOUT + 60,
        )
        assert proc.returncode == 0, (
            output_of(proc) + "\n--- serve\n" + log_path.read_text()[-4000:]
        )
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert list(manifest["entries"]) == ["invoice-0006-dutch.pdf"]
    finally:
        stop_process(serving)


def test_ci_example_triggers_an_on_demand_deployment_and_fails_with_the_run():
    workflow = yaml.safe_load((ROOT / "deployments" / "ci" / "invoices-run.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    [command] = [step["run"] for step in steps if "prefect deployment run" in step.get("run", "")]
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {f"process-invoices/{d['name']}" for d in spec["deployments"]}
    target = re.search(r"prefect deployment run\s+['\"]?([\w-]+/[\w-]+)", command).group(1)
    assert target in names
    assert "--watch" in command
    # No `|| true`, no pipe that would hide the exit code of `--watch`.
    assert "|| true" not in command and not re.search(r"--watch[^\n]*\|", command)
    from prefect.utilities.callables import parameter_schema

    from flows.process_invoices import process_invoices

    known = set(parameter_schema(process_invoices).properties)
    for param in re.findall(r"--param[ =]['\"]?(\w+)=", command):
        assert param in known, param
    env = {k: v for step in steps for k, v in (step.get("env") or {}).items()}
    env.update(workflow.get("env") or {})
    for job in workflow["jobs"].values():
        env.update(job.get("env") or {})
    assert "secrets.PREFECT_API_URL" in str(env.get("PREFECT_API_URL"))


def test_two_workers_split_one_batch_into_shards_sharing_one_manifest(
    deployed, prefect_server, moto_endpoint, s3_bucket, tmp_path_factory
):
    """Past one machine: two `process` workers (separate processes, one flow run at a time
    each) on one work pool, one batch split into two sharded flow runs, one S3 manifest."""
    from tasks.pipeline import in_shard, parse_shard

    names = sorted(p.name for p in SAMPLES.glob("*.pdf"))
    put_invoices(moto_endpoint, s3_bucket, "sharded", sample_files(*names))
    env = {**deployed, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    workers, logs = [], []
    for name in ("shard-worker-a", "shard-worker-b"):
        home = tmp_path_factory.mktemp(name)
        logs.append(home / "worker.log")
        with open(logs[-1], "wb") as log:
            workers.append(
                subprocess.Popen(
                    [
                        PREFECT,
                        "worker",
                        "start",
                        "--pool",
                        "invoices",
                        "--work-queue",
                        "shards",
                        "--type",
                        "process",
                        "--limit",
                        "1",
                        "--name",
                        name,
                    ],
                    cwd=home,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    async def run_shards(client):
        from prefect.deployments import run_deployment

        runs = [
            await run_deployment(
                "process-invoices/on-demand",
                timeout=0,
                work_queue_name="shards",
                parameters={
                    "source": f"s3://{s3_bucket}/sharded",
                    "output": f"s3://{s3_bucket}/sharded-out",
                    "extractor": "offline",
                    "aws_credentials": AWS_BLOCK_REF,
                    "shard": f"{i}/2",
                },
            )
            for i in range(2)
        ]
        deadline = time.monotonic() + WATCH_TIMEOUT
        while True:
            runs = [await client.read_flow_run(run.id) for run in runs]
            if all(run.state.is_final() for run in runs) or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(1)

    try:
        runs = on_server(prefect_server, run_shards)
    finally:
        for proc in workers:
            stop_process(proc)
    worker_logs = [log.read_text() for log in logs]
    assert all(run.state.is_completed() for run in runs), (
        [run.state for run in runs],
        [text[-2000:] for text in worker_logs],
    )

    # Each worker ran one of the two runs; each run recorded exactly its shard, once.
    # (a worker may try to submit a run the other took first: "Aborted submission")
    ran = [set(re.findall(r"/runs/flow-run/([0-9a-f-]{36})", text)) for text in worker_logs]
    assert sorted(map(len, ran)) == [1, 1] and ran[0] | ran[1] == {str(run.id) for run in runs}
    entries = read_json(moto_endpoint, s3_bucket, "sharded-out/manifest.json")["entries"]
    assert set(entries) == set(names)
    for i, run in enumerate(runs):
        mine = {k for k, e in entries.items() if e["flow_run_id"] == str(run.id)}
        assert mine == {n for n in names if in_shard(n, parse_shard(f"{i}/2"))} != set()
