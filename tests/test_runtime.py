"""mage_ray.runtime: a private local Ray listens on loopback only and serves the State API Ray Train polls.

Listening sockets are read from /proc/net/tcp and /proc/net/tcp6 (no ``ss`` needed) and matched to the Ray
processes through the socket inodes in /proc/<pid>/fd.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mage_ray import runtime

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _hex_address(field: str) -> tuple[str, int]:
    """``0100007F:1F90`` -> ("127.0.0.1", 8080) on a little-endian machine: the address is the kernel's 32-bit
    words in host byte order, 4 of them for IPv6; the port is plain hex."""
    addr, port = field.split(":")
    step = -1 if sys.byteorder == "little" else 1
    raw = b"".join(bytes.fromhex(addr[i : i + 8])[::step] for i in range(0, len(addr), 8))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    inode_pid = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inode_pid[target[8:-1]] = pid
        except OSError:  # the process exited, or an fd closed while we read
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == LISTEN and cols[9] in inode_pid:
                out.append((inode_pid[cols[9]], *_hex_address(cols[1])))
    return out


def _name(pid: int) -> str:
    """``ray::RayTrainWorker`` / ``gcs_server`` / ... (Ray names its workers by their current task)."""
    import psutil

    try:
        return f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}"
    except psutil.Error:
        return str(pid)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample lines are a little-endian kernel's")
def test_proc_net_addresses_decode():
    """Lines as the kernel writes them: 127.0.0.1:8265 (IPv4), ::ffff:127.0.0.1:6379 and :: (any, IPv6)."""
    assert _hex_address("0100007F:2049") == ("127.0.0.1", 8265)
    addr, port = _hex_address("0000000000000000FFFF00000100007F:18EB")
    assert ipaddress.ip_address(addr) == ipaddress.ip_address("::ffff:127.0.0.1") and port == 6379
    assert _hex_address("00000000000000000000000000000000:0050") == ("::", 80)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_cluster_keeps_its_addresses_and_gets_the_library_env(monkeypatch):
    """With RAY_ADDRESS set, init_ray joins that cluster as it is (no loopback setting, no dashboard options) and
    hands the job's processes the library environment; variables the user set are left to them."""
    import warnings

    import ray

    calls = []
    monkeypatch.setattr(os, "environ", dict(os.environ))  # init_ray writes the environment: restore it after
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    for var in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTHONWARNINGS", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        monkeypatch.delenv(var, raising=False)
    with warnings.catch_warnings():  # and the warning filters
        runtime.init_ray()
        monkeypatch.setenv("PYTHONWARNINGS", "default")  # the user's own
        monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH")
        runtime.init_ray()
    env = {"PYTHONWARNINGS": runtime.LIBRARY_ENV["PYTHONWARNINGS"], "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert calls == [
        {"address": "10.0.0.5:6379", "log_to_driver": True, "runtime_env": {"env_vars": env}},
        {
            "address": "10.0.0.5:6379",
            "log_to_driver": True,
            "runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        },
    ]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_pythonwarnings_ignores_exactly_the_library_deprecations(tmp_path):
    """A fresh interpreter with the job's PYTHONWARNINGS (what a Ray worker gets) drops the listed library
    warnings and still shows any other FutureWarning."""
    (msg, cat), *_ = runtime.IGNORED_WARNINGS
    code = (
        "import warnings\n"
        f"warnings.warn({msg + ' and will be removed in v6.'!r}, {cat.__name__})\n"
        "warnings.warn('`something_else` is deprecated', FutureWarning)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": runtime.LIBRARY_ENV["PYTHONWARNINGS"]}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr
    assert msg not in err and "`something_else` is deprecated" in err


# The job: init_ray, then one Ray Train run whose single worker writes its MASTER_PORT and waits (up to 120 s) until
# the test has listed the sockets of every Ray process, so the Train worker's own listeners are counted too.
JOB = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from mage_ray.runtime import init_ray

    flag = Path(sys.argv[1])
    init_ray(num_cpus=2)
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        Path(config["flag"] + ".ready").write_text(os.environ["MASTER_PORT"])
        deadline = time.time() + 120
        while not Path(config["flag"] + ".done").exists() and time.time() < deadline:
            time.sleep(0.2)

    TorchTrainer(
        loop,
        train_loop_config={"flag": str(flag)},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="loopback", storage_path=sys.argv[2]),
    ).fit()
    print("job done", flush=True)
    """
)


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_and_train_polls_quietly(tmp_path, repo_root):
    """``python jobs/x.py`` without RAY_ADDRESS: while a Ray Train run is in progress, every TCP listener of the
    driver and its descendant processes (GCS, raylet, object manager, dashboard and its modules, dashboard and
    runtime-env agents, metrics exporters, Train controller and worker) is on 127.0.0.0/8 or ::1, but one: the
    torch.distributed TCPStore that the rank-0 Train worker serves on MASTER_PORT, which torch binds to every
    interface whatever MASTER_ADDR says (no option to narrow it). The job's log has none of the placement-group
    cleaner's "Failed to query Ray Train Controller actor state" lines (about one a second when the State API is
    missing). Slow: a local Ray with its dashboard and one Train worker start, about 40 s on 2 busy cores."""
    import psutil

    script = tmp_path / "job.py"
    script.write_text(JOB)
    flag = tmp_path / "flag"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(repo_root), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(script), str(flag), str(tmp_path / "ray")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 240
        while not Path(f"{flag}.ready").exists() or not Path(f"{flag}.ready").read_text():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "the Train worker did not start within 240 s"
            time.sleep(0.5)
        time.sleep(3)  # the cleaner polls once a second: give it a few tries
        pids = {proc.pid} | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        listeners = [(_name(pid), a, port) for pid, a, port in listening_sockets(pids)]
        Path(f"{flag}.done").touch()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "job done" in out
    assert len(listeners) >= 3, listeners  # GCS, raylet, dashboard at least: the sockets were found
    master_port = int(Path(f"{flag}.ready").read_text())
    outside = [x for x in listeners if not is_loopback(x[1]) and x[2] != master_port]
    assert outside == [], f"listening outside loopback: {outside}"
    assert "Failed to query Ray Train Controller" not in out
    assert "(PlacementGroupCleaner pid=" not in out, out[
        -4000:
    ]  # nor any other line (e.g. a traceback) from it


@pytest.mark.parametrize("tty", [True, False])
def test_data_progress_keeps_ray_data_info_lines_off_a_terminal_only(monkeypatch, tty):
    """On a terminal Ray Data draws progress bars and its INFO lines leave the console (the session's
    ray-data.log keeps them); piped to a file its INFO progress lines stay, since bars cannot be drawn there."""
    import logging

    from ray.data import DataContext

    handlers = logging.getLogger("ray.data").handlers
    for h in handlers:
        monkeypatch.setattr(h, "level", h.level)  # restored after the test
    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    runtime.data_progress()
    assert DataContext.get_current().enable_progress_bars
    levels = {h.name: h.level for h in handlers}  # Ray Data names its handlers after its logging config
    assert levels["console"] == (logging.WARNING if tty else logging.INFO)
    assert levels["file"] <= logging.INFO
