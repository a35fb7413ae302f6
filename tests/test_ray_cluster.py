"""`santacpu eval --ray-address`: joining an existing Ray cluster, and every way of failing to.
An address that does not answer as a Ray cluster (nothing listening, a web server, a silent
listener, one that hangs up) is one error line within seconds, where Ray would retry it for
minutes; a cluster that asks for its token is one line naming what to set, and so is one that
stops answering mid-run; SIGTERM while Ray starts is santacpu's "terminated"; and a real `ray start --head` cluster is joined and runs the
problems. The in-process local cluster (`--ray`) is tested in test_harness.py."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

from santacpu.errors import SantacpuError
from santacpu.harness.ray_pipeline import (_check_answers_as_ray, _ClusterWatch, _core_lines_kept, _drive,
                                            _watched_address)
from santacpu.harness.settings import EvalSettings

from helpers import one_error_line, run_santacpu, santacpu_env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Listener:
    """A TCP listener on 127.0.0.1 that accepts connections and then, per `behaviour`, stays
    silent ("silent") or hangs up at once ("hang up")."""

    def __init__(self, behaviour: str):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.behaviour, self.accepted = behaviour, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return  # closed
            if self.behaviour == "hang up":
                connection.close()
            else:
                self.accepted.append(connection)

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)  # (close alone leaves it listening while accept() waits on it)
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def web_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_addresses_that_are_not_a_ray_cluster_are_refused_quickly(web_server):
    def refusal(address: str, timeout_s: float = 5.0) -> tuple[str, float]:
        started = time.monotonic()
        with pytest.raises(SantacpuError) as caught:
            _check_answers_as_ray(address, timeout_s=timeout_s)
        return str(caught.value), time.monotonic() - started

    message, took = refusal(web_server)  # HTTP/1.1 answers an HTTP/2 start with an error page
    assert message.startswith(f"{web_server} answers, but not as a Ray cluster") and "port 6379" in message
    assert took < 5.0

    hangs_up = _Listener("hang up")
    try:
        assert refusal(hangs_up.address)[0].startswith(f"{hangs_up.address} answers, but not as a Ray cluster")
    finally:
        hangs_up.close()

    silent = _Listener("silent")
    try:
        message, took = refusal(silent.address, timeout_s=0.5)
        assert message.startswith(f"{silent.address} took the connection but said nothing in 0.5 s"), message
        assert 0.4 < took < 3.0
    finally:
        silent.close()

    closed = f"127.0.0.1:{_free_port()}"
    message, took = refusal(closed)
    assert message.startswith(f"cannot reach the Ray cluster at {closed}: ") and took < 5.0


def test_the_command_line_refuses_a_web_server_as_a_cluster_in_one_line(trained_q8, web_server, tmp_path):
    started = time.monotonic()
    done = run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--ray-address", web_server,
                        "--limit", "1", "--out", tmp_path / "r.jsonl", timeout=120)
    one_error_line(done, f"{web_server} answers, but not as a Ray cluster")
    assert time.monotonic() - started < 60  # (Ray itself kept retrying such an address for 5 minutes and more)
    assert not (tmp_path / "r.jsonl").exists()


def test_standard_error_written_by_native_code_is_kept_from_the_terminal(capfd):
    with _core_lines_kept() as lines:
        os.write(2, b"[2026-12-07 15:00:00,000 W 1 1] core_worker: retrying\nsecond line\n")
    os.write(2, b"after\n")
    assert lines == ["[2026-12-07 15:00:00,000 W 1 1] core_worker: retrying", "second line"]
    assert capfd.readouterr().err == "after\n"


def test_a_cluster_that_stops_answering_mid_run_is_one_line_within_seconds():
    gcs = _Listener("hang up")
    watch = _ClusterWatch(gcs.address, every_s=0.0, silent_s=0.3)
    watch.check()
    gcs.close()  # (the cluster's machine gone: its port refuses connections)
    watch.check()  # silent since now, not yet for 0.3 s
    time.sleep(0.35)
    with pytest.raises(SantacpuError, match=r"the Ray cluster at 127.0.0.1:\d+ stopped answering: the "
                                            r"problems finished so far are kept in the results file, and --resume"):
        watch.check()

    released = threading.Event()

    class RowsNeverCome:  # a dataset whose generating actors died with the cluster
        def iter_rows(self):
            released.wait()
            yield from ()

    gcs = _Listener("hang up")
    watch = _ClusterWatch(gcs.address, every_s=0.1, silent_s=0.5)
    gcs.close()
    started = time.monotonic()
    with pytest.raises(SantacpuError, match="stopped answering"):  # (not a wait for rows for ever)
        _drive(None, RowsNeverCome(), None, EvalSettings(), lambda record: None, watch)
    assert time.monotonic() - started < 5.0
    released.set()  # (the rows thread ends)

    class JoinedRay:  # (its runtime context names the GCS of the cluster it joined or started)
        @staticmethod
        def get_runtime_context():
            return types.SimpleNamespace(gcs_address="10.0.0.5:6379")

    assert _watched_address(JoinedRay, "127.0.0.1:6379") == "127.0.0.1:6379"  # (the GCS may call itself otherwise)
    assert _watched_address(JoinedRay, "auto") == _watched_address(JoinedRay, None) == "10.0.0.5:6379"


def _run_with_ray_init(body: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`santacpu eval ... ARGS` in a process whose `ray.init` is `def init(**kwargs): BODY`
    (with os, signal and sys imported): how Ray's start-up behaves where a test cannot make it."""
    script = ("import os, signal, sys, ray\n"
              "def init(**kwargs):\n" + "".join(f"    {line}\n" for line in body.splitlines()) +
              "ray.init = init\n"
              "import santacpu.harness.ray_pipeline as pipeline\n"
              "pipeline._check_answers_as_ray = lambda address, timeout_s=10.0: None\n"
              "from santacpu.cli import main\n"
              "main()\n")
    return subprocess.run([sys.executable, "-c", script, "eval", "humaneval-infill", *args, "--limit", "1",
                           "--out", str(tmp_path / "r.jsonl")], capture_output=True, env=santacpu_env(), timeout=120)


def test_a_cluster_that_asks_for_its_token_or_none_found_is_one_line_naming_what_to_do(trained_q8, tmp_path):
    # What Ray 2.60 does, joining a cluster with token authentication on without the token: its
    # core writes a warning line a second to standard error for ~20 s, then ray.init raises this.
    refused = _run_with_ray_init(
        "os.write(2, b'[2026-12-07 15:00:00,000 W 1 1] gcs_rpc_client.h:157: Failed to connect to GCS at "
        "address 127.0.0.1:6379 within 5 seconds. Status: Unauthenticated\\n')\n"
        "raise ConnectionError('Failed to connect to Ray cluster')",
        "--model", str(trained_q8), "--ray-address", "127.0.0.1:6379", tmp_path=tmp_path)
    err = refused.stderr.decode()
    assert err.startswith("santacpu: joining the Ray cluster at 127.0.0.1:6379"), err
    refused.stderr = err.split("\n", 1)[1].encode()
    one_error_line(refused, "cannot join the Ray cluster at 127.0.0.1:6379: it asks for its token")
    assert "set RAY_AUTH_MODE=token here too" in err and "gcs_rpc_client" not in err

    other = _run_with_ray_init("raise ConnectionError('Failed to connect to Ray cluster')",
                               "--model", str(trained_q8), "--ray-address", "127.0.0.1:6379", tmp_path=tmp_path)
    other.stderr = other.stderr.split(b"\n", 1)[1]
    one_error_line(other, "cannot join the Ray cluster at 127.0.0.1:6379: Failed to connect to Ray cluster")

    none_here = _run_with_ray_init("raise ConnectionError('Could not find any running Ray instance. Please specify "
                                   "the one to connect to by setting `--address` flag')",
                                   "--model", str(trained_q8), "--ray-address", "auto", tmp_path=tmp_path)
    none_here.stderr = none_here.stderr.split(b"\n", 1)[1]
    one_error_line(none_here, "--ray-address auto: no Ray cluster runs on this machine (`ray start --head` starts one")


def test_sigterm_while_ray_starts_is_santacpus_terminated(trained_q8, tmp_path):
    # ray.init puts a handler of its own in place of santacpu's, one that exits with 15 and no word.
    done = _run_with_ray_init("signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))\n"
                              "os.kill(os.getpid(), signal.SIGTERM)",
                              "--model", str(trained_q8), "--ray", tmp_path=tmp_path)
    err = done.stderr.decode()
    assert done.returncode == 143, (done.returncode, err)
    assert err.splitlines()[-1] == "santacpu: terminated" and "Traceback" not in err, err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_ray_start_cluster_is_joined_and_runs_the_problems(trained_q8, tmp_path):
    port = _free_port()
    # Authentication off (Ray 2.59+ turns it on for `ray start`), a temporary folder of its own,
    # one CPU, node 127.0.0.1 (Ray 2.60's servers still listen on every interface; the run is
    # ~10 s): this is the test's cluster, not the machine's. Without a drain on SIGTERM it stops
    # in seconds (Ray Data's actors, left on the cluster, hold a drain to its 30 s limit).
    env = santacpu_env({"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    ray_files = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # (its socket paths must stay under 108 bytes)
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={ray_files}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        for _ in range(120):  # the head's GCS answers within seconds
            try:
                _check_answers_as_ray(address, timeout_s=1.0)
                break
            except SantacpuError:
                assert head.poll() is None, head.stderr.read().decode()
                time.sleep(0.5)
        out = tmp_path / "joined.jsonl"
        done = run_santacpu("eval", "humaneval-infill", "--model", trained_q8, "--ray-address", address,
                            "--benchmark", "random-span-light", "--limit", "1", "--max-new-tokens", "4",
                            "--out", out, "--json", env={"RAY_AUTH_MODE": "disabled"},
                            timeout=240)
        assert done.returncode == 0, done.stderr.decode()
        assert f"santacpu: joining the Ray cluster at {address}" in done.stderr.decode()
        summary = json.loads(done.stdout)["model"]
        assert summary["problems"] == 1 and summary["run"]["where"].startswith("on ray")
        assert len(out.read_text().splitlines()) == 2  # the header and the one problem's record
    finally:
        if head.poll() is None:
            head.terminate()  # (`ray start --block` stops its cluster; given to all its processes, slowly)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        shutil.rmtree(ray_files, ignore_errors=True)
