"""Multi-process runs: input checks, SLURM's environment, the rendezvous, the watchdog and losing a peer.

The SLURM tests set the variables as ``srun`` sets them; the two-process tests run the real command line on
127.0.0.1 (gloo, 2 simulated CPU devices per process), kill one process with SIGKILL mid-run, and resume the run
under an emulated SLURM job whose compressed node list ``127.0.0.[1-2]`` resolves locally.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from _two_processes import free_port, without_device_count

from jaxalgo import cli
from jaxalgo import parallel as par
from jaxalgo.parallel import _cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch):
    """The tests decide which scheduler variables exist (the suite may itself run inside a SLURM job)."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(name)


# ---- input checks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:99999", "coordinator: port 99999 in '127.0.0.1:99999' is out of range; expected HOST:PORT"),
        ("127.0.0.1:0", "coordinator: port 0 in '127.0.0.1:0' is out of range"),
        ("127.0.0.1:abc", "coordinator: port 'abc' in '127.0.0.1:abc' is not an integer"),
        (":80", "coordinator: ':80' has no valid host"),
        ("host", "coordinator: 'host' has no port"),
        ("::1:80", "coordinator: '::1:80' is ambiguous; write an IPv6 host in brackets"),
        ("my host:80", "coordinator: 'my host:80' has no valid host"),
    ],
)
def test_bad_coordinator_addresses_are_refused(address, message):
    with pytest.raises(ValueError) as error:
        par.parse_coordinator(address)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_good_coordinator_addresses_parse():
    assert par.parse_coordinator("127.0.0.1:12345") == ("127.0.0.1", 12345)
    assert par.parse_coordinator("[::1]:80") == ("::1", 80)
    assert par.parse_coordinator("node-01.cluster:65535") == ("node-01.cluster", 65535)


def test_an_unresolvable_host_is_refused():
    with pytest.raises(ValueError, match=r"coordinator: host 'no-such-host\.invalid' of .* does not resolve"):
        _cluster.check_resolvable("no-such-host.invalid:1234")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator", "127.0.0.1:99999"], "coordinator: port 99999 in '127.0.0.1:99999' is out of range"),
        (["--coordinator", "127.0.0.1:abc"], "coordinator: port 'abc' in '127.0.0.1:abc' is not an integer"),
        (["--coordinator", ":80"], "coordinator: ':80' has no valid host"),
        (["--coordinator", "host"], "coordinator: 'host' has no port"),
        (["--num-processes", "0"], "num_processes: must be an integer >= 1, got 0"),
        (["--process-id", "2"], "process_id: must be in [0, 2), got 2"),
        (["--process-id", "-1"], "process_id: must be an integer >= 0, got -1"),
        (["--peer-timeout", "0"], "peer_timeout: must be a number of seconds > 0, got 0"),
        (["--init-timeout", "-5"], "init_timeout: must be a number of seconds > 0, got -5"),
        (["--parallel", "none"], "parallel: 'none' runs on one device, but this run has 2 processes (explicit)"),
    ],
)
def test_cli_refuses_bad_process_flags_in_one_line_before_any_work(flags, message, capsys):
    argv = ["train", "--parallel", "ddp", "--coordinator", "127.0.0.1:12345", "--num-processes", "2"]
    argv += ["--process-id", "0", "--quiet", *flags]
    started = time.perf_counter()
    assert cli.main(argv) == 2
    assert time.perf_counter() - started < 10  # refused at once, not after a connection timeout
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"jaxalgo: error: {message}"), lines


def test_cli_refuses_partial_process_flags(capsys):
    assert cli.main(["train", "--parallel", "ddp", "--coordinator", "127.0.0.1:12345"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxalgo: error: num_processes, process_id: needed together with coordinator")


def test_cli_refuses_a_single_device_strategy_under_srun(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[1-4]")
    assert cli.main(["train", "--quiet"]) == 2
    lines = capsys.readouterr().err.splitlines()
    several = ", ".join(n for n, e in par.STRATEGIES.items() if not e.options.single_device)
    assert "ddp" in several and "none" not in several
    assert lines == [
        "jaxalgo: error: parallel: 'none' runs on one device, but this run has 4 processes (slurm); choose a "
        f"strategy for several devices ({several}) or start a single process"
    ]


def test_library_keeps_its_argument_names():
    with pytest.raises(ValueError, match=r"num_processes, process_id: needed together with coordinator_address"):
        par.initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"peer_timeout_seconds: must be a number of seconds > 0, got 0"):
        par.initialize_distributed(peer_timeout_seconds=0)


# ---- SLURM's environment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-02]", ["node01", "node02"]),
        ("gpu[1-3,7]", ["gpu1", "gpu2", "gpu3", "gpu7"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("b[2-3],a1", ["b2", "b3", "a1"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-100]", ["n098", "n099", "n100"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib,login", ["n1-ib", "n2-ib", "login"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
        (" node[5] ", ["node5"]),
    ],
)
def test_nodelists_expand(text, hosts):
    assert par.expand_nodelist(text) == hosts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a host list such as node[01-04]"),
        ("a,,b", "has an empty host name"),
        ("n[1-2", "has a '[' without ']'"),
        ("n1-2]", "has a ']' without '['"),
        ("n[]", "has an empty range []"),
        ("n[3-1]", "has the range '3-1' whose end is below its start"),
        ("n[a-c]", "has the range 'a-c'; expected numbers"),
        ("n[[1-2]]", "has nested brackets"),
    ],
)
def test_bad_nodelists_are_refused(text, message):
    with pytest.raises(ValueError) as error:
        par.expand_nodelist(text)
    assert str(error.value).startswith("SLURM_STEP_NODELIST: ") and message in str(error.value)


def test_tasks_per_node_expand():
    assert _cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert _cluster.expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match=r"SLURM_STEP_TASKS_PER_NODE: expected counts such as 2\(x3\),1"):
        _cluster.expand_tasks_per_node("2(3)")


@pytest.mark.parametrize("nodelist", ["node[01-02]", "gpu[1-3,7]", "a1,b[2-3]", "node007", "n[098-100],x"])
@pytest.mark.parametrize("job_id", ["1", "4095", "4096", "123456789"])
def test_coordinator_agrees_with_jax_own_slurm_detection(monkeypatch, nodelist, job_id):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    env = {"SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    env["SLURM_STEP_NODELIST"] = nodelist
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plan = _cluster.slurm_plan(env)
    assert plan.coordinator == SlurmCluster.get_coordinator_address(None, None)
    assert 61440 <= par.slurm_port(job_id) <= 65535


def slurm_env(**changes: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NODELIST": "gpu[03-04]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    env.update(changes)
    return {k: v for k, v in env.items() if v}


def test_slurm_plan_reads_srun_variables():
    plan = _cluster.slurm_plan(slurm_env())
    assert plan == par.ProcessPlan("slurm", 8, 5, f"gpu03:{4242 % 4096 + 61440}", (1,))
    # --gpus-per-task=2: local task 1 drives GPUs 2 and 3 of its node ...
    assert _cluster.slurm_plan(slurm_env(SLURM_GPUS_PER_TASK="2")).local_device_ids == (2, 3)
    assert _cluster.slurm_plan(slurm_env(SLURM_GPUS_PER_TASK="a100:2")).local_device_ids == (2, 3)
    # ... unless SLURM already bound them (it sees just its own two)
    bound = slurm_env(SLURM_GPUS_PER_TASK="2", CUDA_VISIBLE_DEVICES="2,3")
    assert _cluster.slurm_plan(bound).local_device_ids is None
    # one task per node drives every GPU it sees
    assert _cluster.slurm_plan(slurm_env(SLURM_STEP_TASKS_PER_NODE="1(x8)")).local_device_ids is None
    # the job's node list when the step's is absent; a single task is no multi-process run
    fallback = slurm_env(SLURM_STEP_NODELIST="", SLURM_JOB_NODELIST="a1,b[2-3]")
    assert _cluster.slurm_plan(fallback).coordinator.startswith("a1:")
    assert _cluster.slurm_plan(slurm_env(SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    with pytest.raises(ValueError, match=r"SLURM_JOB_ID: not set, but SLURM_NTASKS and SLURM_PROCID are"):
        _cluster.slurm_plan(slurm_env(SLURM_JOB_ID=""))
    with pytest.raises(ValueError, match=r"SLURM_PROCID: expected an integer in the environment, got 'x'"):
        _cluster.slurm_plan(slurm_env(SLURM_PROCID="x"))


def test_resolve_processes_merges_flags_and_environment():
    assert par.resolve_processes(environ={}) == par.ProcessPlan("single", 1, 0)
    assert par.resolve_processes(num_processes=1, environ={}) == par.ProcessPlan("single", 1, 0)
    explicit = par.resolve_processes("10.0.0.1:999", 3, 2, environ={})
    assert explicit == par.ProcessPlan("explicit", 3, 2, "10.0.0.1:999")
    env = slurm_env()
    assert par.resolve_processes(environ=env) == _cluster.slurm_plan(env)
    assert par.resolve_processes("10.0.0.1:999", environ=env).coordinator == "10.0.0.1:999"
    assert par.resolve_processes(num_processes=8, process_id=5, environ=env).process_id == 5
    with pytest.raises(ValueError, match=r"num_processes: 2 is given but SLURM_NTASKS says 8; drop the flag"):
        par.resolve_processes(num_processes=2, environ=env)
    with pytest.raises(ValueError, match=r"process_id: must be in \[0, 8\), got 9"):
        par.resolve_processes(environ=slurm_env(SLURM_PROCID="9"))
    ompi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    ompi["OMPI_MCA_orte_hnp_uri"] = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    plan = par.resolve_processes(environ=ompi)
    assert plan == par.ProcessPlan("openmpi", 2, 1, f"10.96.0.1:{1531576320 // 4096 % 4096 + 61440}", (1,))


# ---- the rendezvous ----------------------------------------------------------------------------------------------


def meet(plans, timeout):
    """Runs the rendezvous of each plan in its own thread; returns {process_id: None or the error}."""
    results = {}

    def run(plan):
        try:
            par.rendezvous(plan, timeout)
            results[plan.process_id] = None
        except (par.ClusterError, ValueError) as error:
            results[plan.process_id] = error

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results


def test_rendezvous_brings_every_process_together_and_frees_the_port():
    address = f"127.0.0.1:{free_port()}"
    results = meet([par.ProcessPlan("explicit", 3, i, address) for i in (2, 0, 1)], timeout=20)
    assert results == {0: None, 1: None, 2: None}
    with socket.socket() as s:  # jax's coordination service can take the port now
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))


def test_rendezvous_names_the_processes_that_never_connected():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    results = meet([par.ProcessPlan("explicit", 4, i, address) for i in (0, 2)], timeout=1.5)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 5
    message = f"processes 1, 3 of 4 never connected to the coordinator {address} within 1.5 s"
    assert str(results[0]).startswith(message) and str(results[2]).startswith(message)


def test_a_process_alone_names_the_coordinator():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    results = meet([par.ProcessPlan("explicit", 2, 1, address)], timeout=1.0)
    assert time.monotonic() - started < 4
    assert str(results[1]).startswith(f"the coordinator {address} (process 0) did not let process 1 of 2 start")


def test_rendezvous_refuses_duplicate_ids_and_different_counts():
    address = f"127.0.0.1:{free_port()}"
    results = meet([par.ProcessPlan("explicit", 3, i, address) for i in (0, 1, 1)], timeout=5)
    assert "process_id: two processes claim id 1; give each process its own --process-id" in str(results[0])
    address = f"127.0.0.1:{free_port()}"
    results = meet([par.ProcessPlan("explicit", 2, 0, address), par.ProcessPlan("explicit", 3, 1, address)], 5)
    assert str(results[0]).startswith("num_processes: process 1 was started with 3 processes, process 0 with 2")
    assert str(results[1]) == str(results[0])


def test_process_0_refuses_a_port_in_use():
    with socket.create_server(("", 0)) as busy:
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(ValueError, match=r"coordinator: process 0 cannot listen on port \d+ of '127\.0\.0\.1"):
            par.rendezvous(par.ProcessPlan("explicit", 2, 0, address), 1.0)


# ---- the watchdog ------------------------------------------------------------------------------------------------


class FakeStore:
    """The two key-value calls the watchdog makes, in memory; ``down`` makes them fail like a lost coordinator."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.down = False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        assert allow_overwrite
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_watchdog_names_a_silent_peer_after_the_timeout_only():
    store, now = FakeStore(), [0.0]
    dogs = [par.Watchdog(store, i, 3, 10.0, clock=lambda: now[0]) for i in range(3)]
    for _ in range(15):  # all three beat for 15 s
        now[0] += 1.0
        for d in dogs:
            d.beat()
        assert all(d.verdict() is None for d in dogs)
    for _ in range(10):  # process 2 falls silent: still within the timeout
        now[0] += 1.0
        dogs[0].beat()
        dogs[1].beat()
    assert dogs[0].verdict() is None
    now[0] += 1.5
    dogs[0].beat()
    verdict = dogs[0].verdict()
    assert re.match(r"jaxalgo: error: lost process 2 of 3: no heartbeat for 1[01] s \(--peer-timeout 10;", verdict)
    assert "process 0 stops (exit status 69)" in verdict and "\n" not in verdict


def test_watchdog_names_the_coordinator_when_the_store_stops_answering():
    store, now = FakeStore(), [0.0]
    dog = par.Watchdog(store, 1, 2, 5.0, clock=lambda: now[0])
    store.down = True
    now[0] = 4.0
    assert dog.verdict() is None
    now[0] = 6.0
    assert dog.verdict().startswith("jaxalgo: error: lost the coordinator (process 0 of 2): its key-value store")


def test_watchdog_threads_call_on_lost_once_and_stop_quietly():
    store, lost = FakeStore(), []
    fired = threading.Event()
    dog = par.Watchdog(store, 0, 2, 0.5, on_lost=lambda m: (lost.append(m), fired.set())).start()
    assert fired.wait(5) and lost[0].startswith("jaxalgo: error: lost process 1 of 2")
    dog.close()
    quiet = par.Watchdog(FakeStore(), 0, 2, 0.5, on_lost=lost.append).start()
    quiet.stop()  # this process is finishing: its peers' silence is no longer a loss
    time.sleep(1.0)
    quiet.close()
    assert len(lost) == 1


# ---- the supervisor's stderr relay -------------------------------------------------------------------------------


def test_relay_holds_native_crash_output_back(tmp_path):
    now = [0.0]
    path = tmp_path / "err"
    with open(path, "wb") as out:
        relay = _cluster._StderrRelay(out.fileno(), hold=2.0, clock=lambda: now[0])
        relay.feed(b"epoch 1\n\r 10%|#  |")  # ordinary lines and a progress update pass at once
        relay.feed(b"W1202 07:41:11.414995   10276 coordination_service.cc:1549] a warning\nafter it\n")
        relay.tick()
        now[0] = 2.5
        relay.tick()  # a warning that did not end the worker is shown, late
        relay.feed(b"terminate called after throwing an instance of '")  # C++ writes it in pieces
        relay.feed(b"gloo::EnforceNotMet'\n  what():  ")
        relay.feed(b"[enforce fail at pair.cc:459] Received data size doesn't match\n")
        relay.feed(b"    @     0x7f7d50240634  absl::LogMessage::SendToLog()\n")
        now[0] = 60.0
        relay.tick()  # fatal output waits for the worker's end ...
        relay.drop()  # ... and goes when a lost peer explains it
        relay.feed(b"done\nno newline")
        now[0] = 61.0
        relay.tick()
        now[0] = 63.0
        relay.tick()  # a piece without a newline waits for one, but not for ever
    assert path.read_bytes() == (
        b"epoch 1\n\r 10%|#  |W1202 07:41:11.414995   10276 coordination_service.cc:1549] a warning\nafter it\n"
        b"done\nno newline"
    )


def test_relay_holds_a_python_traceback_back_until_it_is_explained_or_not(tmp_path):
    now = [0.0]
    path = tmp_path / "err"
    traceback = b'Traceback (most recent call last):\n  File "<frozen runpy>", line 198\nXlaRuntimeError: closed\n'
    with open(path, "wb") as out:
        relay = _cluster._StderrRelay(out.fileno(), hold=2.0, clock=lambda: now[0])
        relay.feed(b"epoch 1\n" + traceback)
        now[0] = 1.0
        relay.tick()  # held: a lost peer may explain it
        relay.drop()  # ... and one did
        relay.feed(b"epoch 2\n" + traceback)
        relay.release()  # no lost peer: the worker's own error is shown, whole
    assert path.read_bytes() == b"epoch 1\nepoch 2\n" + traceback


# ---- two real processes ------------------------------------------------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
    return without_device_count(env)


def command(*args: str) -> list[str]:
    """``jaxalgo train`` with DDP over 2 simulated devices per process: several local devices, as on a GPU node,
    but not 4 (8 gloo ranks in all make every step's all-reduce several times slower on CPU, for nothing a test
    here checks)."""
    return [sys.executable, "-m", "jaxalgo", "train", "--quiet", "--devices", "2", "--parallel", "ddp", *args]


def finish(processes, timeout):
    """``[(returncode, stderr)]`` of each process; kills any that outlive ``timeout`` seconds."""
    results = []
    try:
        for p in processes:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err.decode(errors="replace")))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def skip_without_gloo(results):
    errors = [err for _, err in results]
    if any("gloo" in e.lower() and "not" in e.lower() and "available" in e.lower() for e in errors):
        pytest.skip("gloo CPU collectives are unavailable in this jaxlib")


@pytest.mark.multiprocess
def test_a_process_started_alone_stops_after_the_init_timeout(tmp_path):
    # (process 1 alone, and several missing, are covered in-process by the rendezvous tests above)
    port = free_port()
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    alone = subprocess.Popen(
        command(*flags, "--init-timeout", "2", "--workdir", str(tmp_path)),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started = time.monotonic()
    [(code, err)] = finish([alone], timeout=150)
    assert time.monotonic() - started < 150  # jax alone aborts after 300 s
    assert code == 69, err
    assert err.splitlines() == [
        f"jaxalgo: error: process 1 of 2 never connected to the coordinator 127.0.0.1:{port} within 2 s; start "
        "every process with the same --coordinator and --num-processes (ids 0-1), or raise --init-timeout"
    ]


def slurm_job_id() -> int:
    """A job id whose coordinator port (as srun's jax would derive it) is free here."""
    for job in range(int(time.time()) % 4096, 10**6, 4096 // 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", par.slurm_port(job)))
            except OSError:
                continue
        return job
    raise RuntimeError("no free port in 61440..65535")


def worker_gone(pid: int) -> bool:
    """The process ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read().lower()
    except FileNotFoundError:
        return True


def checkpoint_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if directory.is_dir() else []


@pytest.mark.multiprocess
def test_losing_a_process_stops_the_other_in_one_line_and_the_run_resumes_under_srun(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--epochs", "2", "--checkpoint-every", "4", "--peer-timeout", "5", "--workdir", str(workdir)]
    address = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen(
            command(*flags, "--coordinator", address, "--num-processes", "2", "--process-id", str(i)),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 150
        while not checkpoint_steps(workdir) and time.monotonic() < deadline and processes[0].poll() is None:
            time.sleep(0.05)
        assert checkpoint_steps(workdir), "no checkpoint was written"
        worker = int(subprocess.check_output(["pgrep", "-P", str(processes[1].pid)]).split()[0])
        processes[1].send_signal(signal.SIGKILL)  # mid-run: 44 steps, a checkpoint every 4
        killed = time.monotonic()
        processes[0].wait(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        (code0, err0), _ = finish(processes, timeout=30)
    skip_without_gloo([(code0, err0)])
    assert code0 == 69, err0
    assert stopped_after < 5, stopped_after  # a kill is seen at once; silence after --peer-timeout
    assert err0.splitlines() == [
        "jaxalgo: error: lost process 1 of 2: it ended without a word (killed, or its machine or the network "
        "failed); process 0 stops (exit status 69). Resume from the last checkpoint with --resume once every "
        "process runs."
    ]
    time.sleep(1.5)
    assert worker_gone(worker)
    last = checkpoint_steps(workdir)[-1]
    assert 4 <= last < 44

    # The same run continues under an emulated `srun -N 2 -n 2`: SLURM's variables only, no process flags.
    job = slurm_job_id()
    nodes = {"SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "127.0.0.[1-2]"}
    nodes.update(SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_LOCALID="0")
    resumed = [
        subprocess.Popen(
            command(*flags, "--resume"),
            env=environment(**nodes, SLURM_PROCID=str(i), SLURM_NODEID=str(i)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    results = finish(resumed, timeout=240)
    assert [code for code, _ in results] == [0, 0], results
    with open(workdir / "metrics.jsonl") as f:
        final = [json.loads(line) for line in f if line.strip()][-1]
    assert final["final"] and final["steps"] == 44


def two_processes(process_id: int, port: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]


def metrics_lines(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.multiprocess
def test_a_signal_to_one_process_stops_both_at_one_step_and_the_run_resumes_exactly(tmp_path):
    """SLURM's ``--signal`` reaches the tasks; here only process 1 gets SIGUSR1. jax's preemption service agrees on
    one step: both processes save that step's checkpoint together and exit with status 75, and ``--resume`` in
    two processes ends exactly where an uninterrupted two-process run does."""
    flags = ["--epochs", "10", "--batch-size", "64", "--hidden", "32", "--seed", "3"]
    full = tmp_path / "full"
    processes = [
        subprocess.Popen(
            command(*flags, "--workdir", str(full), *two_processes(i, port)),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for port in [free_port()]
        for i in (0, 1)
    ]
    results = finish(processes, timeout=300)
    skip_without_gloo(results)
    assert [code for code, _ in results] == [0, 0], results

    workdir = tmp_path / "run"
    port = free_port()
    processes = [
        subprocess.Popen(
            command(*flags, "--workdir", str(workdir), *two_processes(i, port)),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 240
        while not metrics_lines(workdir) and time.monotonic() < deadline and processes[0].poll() is None:
            time.sleep(0.02)
        assert metrics_lines(workdir), "the run wrote no epoch line"
        processes[1].send_signal(signal.SIGUSR1)  # to process 1's supervisor, which forwards it to its worker
    finally:
        results = finish(processes, timeout=240)
    assert [code for code, _ in results] == [75, 75], results
    saved = checkpoint_steps(workdir)[-1]
    assert 22 <= saved < 10 * 22, saved  # after the first epoch, before the end
    said = [err.strip().splitlines()[-1] for _, err in results]
    process_1 = rf"jaxalgo: preempted by SIGUSR1: saved a checkpoint at step {saved} in .*--resume"
    process_0 = rf"jaxalgo: preempted by a preemption notice: saved a checkpoint at step {saved} in .*--resume"
    assert re.fullmatch(process_0, said[0]) and re.fullmatch(process_1, said[1]), said

    port = free_port()
    resumed = [
        subprocess.Popen(
            command(*flags, "--workdir", str(workdir), "--resume", *two_processes(i, port)),
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in (0, 1)
    ]
    results = finish(resumed, timeout=300)
    assert [code for code, _ in results] == [0, 0], results
    without_time = lambda lines: [{k: v for k, v in line.items() if k != "seconds"} for line in lines]
    assert without_time(metrics_lines(workdir)) == without_time(metrics_lines(full))
