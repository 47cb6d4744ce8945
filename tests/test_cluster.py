"""cluster.yaml against the cluster launcher's own schema and our invariants; and Ray Jobs for real:
a two-node cluster started on this machine with `ray start` (a head and a worker, each with its own
temp dir) runs a small `recsys pipeline` submitted through the Jobs API."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from recsys.experiment import load_experiment
from recsys.runs import read_json

ROOT = Path(__file__).resolve().parent.parent
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
SENSITIVE_PORTS = {8265: "dashboard / Jobs API", 8000: "Serve HTTP", 10001: "Ray Client"}
WORLD = {"0.0.0.0/0", "::/0"}


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def node_commands(cfg: dict) -> dict[str, list[str]]:
    """Setup commands each node type runs, as the launcher composes them: the global list, then the
    head's list, or a worker type's own worker_setup_commands (which replace the global ones)."""
    out = {}
    for name, node in cfg["available_node_types"].items():
        extra = (cfg.get("head_setup_commands", []) if name == cfg["head_node_type"]
                 else node.get("worker_setup_commands", cfg.get("worker_setup_commands", [])))
        out[name] = [*cfg.get("setup_commands", []), *extra]
    return out


def world_open_ports(cfg: dict) -> set[int]:
    """Sensitive ports that an ingress rule opens to any address."""
    opened = set()
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = ({r.get("CidrIp") for r in rule.get("IpRanges", [])}
                  | {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])})
        if not ranges & WORLD:
            continue
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        opened |= {p for p in SENSITIVE_PORTS if low == -1 or low <= p <= high}
    return opened


def dashboard_hosts(cfg: dict) -> list[str | None]:
    """The --dashboard-host of every `ray start --head` (None where the flag is missing: Ray's default)."""
    hosts = []
    for cmd in cfg["head_start_ray_commands"]:
        if "ray start" in cmd:
            found = re.search(r"--dashboard-host[= ](\S+)", cmd)
            hosts.append(found.group(1) if found else None)
    return hosts


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_validates_against_the_schema_inside_ray():
    jsonschema.validate(cluster_config(), json.loads(RAY_SCHEMA.read_text()))


def test_the_schema_check_can_fail():
    schema = json.loads(RAY_SCHEMA.read_text())
    broken = {**cluster_config(), "head_node_typo": "head"}
    with pytest.raises(jsonschema.ValidationError, match="head_node_typo"):
        jsonschema.validate(broken, schema)
    broken = cluster_config()
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_has_a_head_cpu_workers_and_gpu_workers():
    cfg = cluster_config()
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert types[head]["resources"].get("CPU") == 0  # nothing scheduled beside the driver and the GCS
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert gpu and cpu
    for name in gpu + cpu:
        assert 0 <= workers[name]["min_workers"] <= workers[name]["max_workers"] <= cfg["max_workers"]


def test_every_node_installs_this_project_with_the_right_torch():
    cfg = cluster_config()
    project = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")  # the working tree
    gpu_types = {n for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    for name, cmds in node_commands(cfg).items():
        torch_step = next(i for i, c in enumerate(cmds) if "install" in c and "torch==2.13.0" in c)
        project_step = next(i for i, c in enumerate(cmds) if re.search(rf"pip install .*-e {re.escape(project)}\b", c))
        assert torch_step < project_step, name  # else the project's bare torch requirement pulls CUDA wheels
        cpu_index = "download.pytorch.org/whl/cpu" in cmds[torch_step]
        assert cpu_index == (name not in gpu_types), name
        assert "ray[default" in cmds[project_step] and "==2.60.0" in cmds[project_step]  # same Ray as clients
        assert any("/mnt/shared" in c for c in cmds), f"{name} has no shared filesystem for run directories"


def test_no_dashboard_or_service_port_is_exposed():
    cfg = cluster_config()
    assert dashboard_hosts(cfg) == ["127.0.0.1"]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in starts)
    assert world_open_ports(cfg) == set()
    # a pre-made group named in node_config would bring rules this file cannot show
    assert not any("SecurityGroupIds" in t["node_config"] for t in cfg["available_node_types"].values())
    # token auth on every node, with the token file shipped to every node
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_the_exposure_checks_can_fail():
    cfg = copy.deepcopy(cluster_config())
    cfg["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 8300, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
    ]
    assert world_open_ports(cfg) == {8265, 8000, 10001}
    cfg["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "")
                                      for c in cfg["head_start_ray_commands"]]
    assert dashboard_hosts(cfg) == [None]


def test_run_root_must_be_a_filesystem_path():
    assert load_experiment(None, ["run.root=/mnt/shared/runs"]).run.root == "/mnt/shared/runs"
    with pytest.raises(ValueError, match="run.root=s3://bucket/runs is a URI.*shared filesystem"):
        load_experiment(None, ["run.root=s3://bucket/runs"])


@pytest.mark.parametrize("override", ["data.path=s3://bucket/amazon-beauty", "data.table.items_path=gs://b/items.csv"])
def test_data_locations_must_be_filesystem_paths(override):
    key = override.split("=")[0]
    # refused when the config is loaded, before any stage starts (it used to fail as "not found" when read)
    with pytest.raises(ValueError, match=f"{key}=.* is a URI.*filesystem path"):
        load_experiment(None, ["data.format=beauty", override])
    assert load_experiment(None, ["data.format=beauty", "data.path=/mnt/shared/data/beauty"]).data.path


# ---------------------------------------------------------------- Ray Jobs on a two-node cluster


def free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface (held open together, so none is handed out twice)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({err})"


@dataclass
class LocalCluster:
    dashboard_url: str
    gcs_address: str
    token: str = field(repr=False)  # kept out of failure reports
    procs: dict[str, subprocess.Popen]
    logs: dict[str, Path]
    temp_dirs: dict[str, Path]

    def get(self, path: str, token: str | None = None) -> dict:
        token = self.token if token is None else token
        request = urllib.request.Request(self.dashboard_url + path,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        nodes = self.get("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def diagnostics(self) -> str:
        parts = []
        for name in self.procs:
            session_logs = self.temp_dirs[name] / "session_latest" / "logs"
            parts += [f"--- {name}: ray start (exit code {self.procs[name].poll()})", tail(self.logs[name]),
                      f"--- {name}: raylet.out", tail(session_logs / "raylet.out", 15)]
        return "\n".join(parts)


def start_node(name: str, args: list[str], env: dict, log_dir: Path) -> tuple[subprocess.Popen, Path]:
    log = log_dir / f"{name}.log"
    with open(log, "w") as fh:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", *args], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def stop_node(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to `ray start --block` alone: it drains the node and stops its own processes (signalling
    the whole group at once kills the GCS first, and the head then waits 30 s for it). Then SIGKILL
    to whatever is left of the process group. Never `ray stop`: it would stop every Ray on the machine."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(what: str, check, timeout_s: float, cluster: LocalCluster | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, ValueError, KeyError):  # not up yet
            value = None
        if value:
            return value
        time.sleep(0.5)
    detail = cluster.diagnostics() if cluster else tail(log) if log else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{detail}")


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head and a worker node on this machine, each from its own `ray start --block` in its own process
    group and temp dir, on free ports (other engineers' and tests' Ray instances share the machine).

    Auth: token mode, with a fresh random token given to both nodes as RAY_AUTH_TOKEN (so that neither
    the user's ~/.ray/auth_token nor a disabled mode is what the test exercises), and sent by the client
    as a bearer header; the test also checks that a request without it is refused.

    Temp dirs live under /tmp with short names: Ray's Unix socket paths (temp dir + session name +
    sockets/plasma_store) must stay under ~107 bytes, which pytest's tmp_path can exceed."""
    token = secrets.token_hex(32)
    bin_dir = str(Path(sys.executable).parent)  # jobs run `python`/`recsys` from this venv
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_V2_ENABLED="1", RAY_DATA_LOG_LEVEL="WARNING", PATH=bin_dir + os.pathsep + env["PATH"],
               # On SIGTERM a node drains before it stops, by default for up to 30 s; after the job a detached
               # Ray Data actor (its autoscaling coordinator) keeps the head busy for all of it. A test cluster
               # has nothing to migrate: at 5 s the teardown took 8.1 s, at 1 s 4.4 s.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1")
    ports = iter(free_ports(11))
    gcs, dash = next(ports), next(ports)
    per_node = {"head": ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--ray-client-server-port={next(ports)}"],
                "worker": [f"--address=127.0.0.1:{gcs}"]}
    temp_dirs = {name: Path(tempfile.mkdtemp(prefix=f"rg-{name}-", dir="/tmp")) for name in per_node}
    procs, logs = {}, {}
    cluster = LocalCluster(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token, procs, logs, temp_dirs)
    try:
        for name in per_node:
            args = [*per_node[name], f"--temp-dir={temp_dirs[name]}", "--num-cpus=1",
                    f"--object-store-memory={300 * 2**20}", "--disable-usage-stats",
                    "--min-worker-port=0", "--max-worker-port=0",  # 0: workers bind random free ports
                    f"--dashboard-agent-listen-port={next(ports)}", f"--dashboard-agent-grpc-port={next(ports)}",
                    f"--runtime-env-agent-port={next(ports)}", f"--metrics-export-port={next(ports)}"]
            procs[name], logs[name] = start_node(name, args, env, tmp_path)
            wait_for(f"`ray start` of the {name} node", lambda: "Ray runtime started" in logs[name].read_text()
                     or procs[name].poll() is not None, 90, cluster)
            assert procs[name].poll() is None, f"the {name} node exited\n{cluster.diagnostics()}"
        wait_for("two alive nodes", lambda: len(cluster.alive_nodes()) == 2, 60, cluster)
        yield cluster
    finally:
        for name in reversed(list(procs)):  # the worker first, while the head's GCS is still up
            stop_node(procs[name])
        for path in temp_dirs.values():
            shutil.rmtree(path, ignore_errors=True)


TINY_PIPELINE = ["data.synthetic.n_users=300", "data.synthetic.n_items=80", "data.synthetic.n_topics=4",
                 "model.d_model=32", "model.n_layers=1", "model.d_ff=64", "trainer.optim.epochs=3",
                 "trainer.optim.batch_size=64", "trainer.selection.patience=0",
                 "trainer.resources.num_workers=2"]  # one CPU per node: DDP has to span both nodes
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def epoch_log(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (train_dir / "epochs.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_pipeline_runs_as_a_ray_job_on_two_nodes_and_its_training_resumes_there(two_node_cluster, tmp_path):
    """One job: a `recsys pipeline` whose training runs on two DDP workers, one per node; then a copy of
    its 3-epoch train run, moved to another directory (Ray Train's checkpoint names are relative to the
    run), continues to 5 epochs with `recsys train --resume`, on the same two nodes. (The only DDP
    pipeline and the only Ray Train resume of the suite: a fit costs ~30 s of a 2-core machine.)"""
    from ray.job_submission import JobSubmissionClient

    cluster = two_node_cluster
    with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is really on
        cluster.get("/api/v0/nodes", token="")
    assert refused.value.code == 401
    nodes = {n["node_id"]: n for n in cluster.alive_nodes()}

    run_root = tmp_path / "runs"  # the same path for both nodes: this machine's filesystem is the shared one
    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    # Which `pipelines` does the job import? Asked from / so that only PYTHONPATH can answer, as it does
    # for the `recsys` script: the uploaded tree must win over the copy installed in the venv.
    where = shlex.join(["python", "-c", "import pipelines; print('code from', pipelines.__file__)"])
    # What a stage with use_ray=auto sees inside the job: both nodes, so it takes the Ray path.
    view = shlex.join(["python", "-c", "from pipelines.ray_env import cluster_view; print('cluster:', cluster_view())"])
    moved = tmp_path / "moved"
    resume = (f"cp -r {shlex.quote(str(run_root))}/pipeline/*/train {shlex.quote(str(moved))} && echo resuming at "
              f"$(date +%s.%N) && " + shlex.join(["recsys", "train", "--resume", str(moved), "trainer.optim.epochs=5"]))
    entrypoint = (f"(cd / && {where}) && {view} && "
                  + shlex.join(["recsys", "pipeline", f"run.root={run_root}", *TINY_PIPELINE]) + " && " + resume)
    job = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(ROOT),
        "excludes": [".venv", "runs", ".git", ".pytest_cache", "**/__pycache__", "docs"],
        # Several Ray instances run on this shared machine, and Ray Train's PlacementGroupCleaner, which
        # finds its cluster by looking for local Ray processes, then fails with "Found multiple active Ray
        # instances". Naming the cluster fixes that; on a real cluster there is one Ray per machine.
        "env_vars": {"RAY_ADDRESS": cluster.gcs_address},
    })

    def failure(what: str) -> str:
        info = client.get_job_info(job)
        return (f"{what}: job {job} is {info.status} ({info.message})\n--- job logs (tail)\n"
                f"{client.get_job_logs(job)[-6000:]}\n{cluster.diagnostics()}")

    deadline = time.monotonic() + 330
    while (status := client.get_job_status(job)) not in TERMINAL:
        assert time.monotonic() < deadline, failure("timed out after 330 s")
        time.sleep(1)
    assert status == "SUCCEEDED", failure("the job did not succeed")

    logs = client.get_job_logs(job)
    assert re.search(r"code from \S*working_dir_files\S*/pipelines/__init__\.py", logs)  # the uploaded tree ran
    assert "cluster: ClusterView(nodes=2, remote_address='')" in logs  # auto stages go to Ray here
    (pipeline_dir,) = (run_root / "pipeline").iterdir()
    assert f"pipeline run: {pipeline_dir}" in logs
    assert "| test |" in logs and "recall@10" in logs  # the results table
    result = read_json(pipeline_dir / "metrics.json")
    assert set(result["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}
    assert all(0.0 <= v <= 1.0 for v in result["test"].values())
    test_row = next(line for line in logs.splitlines() if line.startswith("| test |"))
    assert f"{result['test']['recall@10']:.4f}" in test_row  # the table printed is the one saved
    for stage, path in [("pipeline", pipeline_dir), *result["stages"].items()]:  # every stage finished
        assert read_json(Path(path) / "COMPLETE")["stage"] == stage
    train_dir = Path(result["stages"]["train"])
    assert (train_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (train_dir / "training_curve.png").stat().st_size > 10_000
    train = read_json(train_dir / "metrics.json")
    assert train["workers"] == 2 and train["epochs_run"] == 3
    assert train["worker_restarts"] == 0 and train["resumed_from_epochs"] == []
    epochs = epoch_log(train_dir)
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all("valid_recall@10" in e for e in epochs)
    assert train["best_epoch"] == max(epochs, key=lambda e: e["valid_ndcg@10"])["epoch"]
    assert "| test |" in (pipeline_dir / "summary.md").read_text()
    # `recsys evaluate` of the train run, here, reproduces the job's test figures
    from pipelines.cli import main

    assert main(["evaluate", str(train_dir), "--split", "test"]) == 0
    (evaluated,) = (run_root / "evaluate").iterdir()  # beside the pipeline run, not inside it
    assert read_json(evaluated / "metrics.json")["test"] == pytest.approx(result["test"])

    # The resumed copy: epochs 1-3 are the checkpoint's, not trained again; Ray Train restored the
    # epoch-3 checkpoint once (a user's resume, not a worker restart) and trained 4 and 5 after it.
    resumed_at = float(re.search(r"resuming at (\d+\.\d+)", logs).group(1))
    after = epoch_log(moved)
    assert [e["epoch"] for e in after] == [1, 2, 3, 4, 5] and after[:3] == epochs
    assert all(e["finished_at"] > resumed_at for e in after[3:]) and after[3]["resumed_from_epoch"] == 3
    resumed = read_json(moved / "metrics.json")
    assert resumed["resumed_from_epochs"] == [3] and resumed["worker_restarts"] == 0 and resumed["workers"] == 2
    assert read_json(moved / "config.json")["trainer"]["optim"]["epochs"] == 5

    # Both nodes did the work: one Ray Train worker (DDP rank) on each in both fits, and both nodes are
    # still alive.
    actors = cluster.get("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    train_nodes = [a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"]
    assert sorted(train_nodes) == sorted([*nodes, *nodes]), failure(f"train workers ran on {train_nodes}")
    assert {n["node_id"] for n in cluster.alive_nodes()} == set(nodes)
    assert all(nodes[n]["resources_total"]["CPU"] == 1 for n in nodes)
