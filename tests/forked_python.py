"""`python -m <module>` and `python <script>` for the tests, forked from a server that has already done the imports
(tests/cli_server.py), a few seconds saved a run.

run_cli and run_script return what `subprocess.run(..., capture_output=True, text=True)` returns: each run is its
own process, with its own exit status, environment, random seeds and spawned workers; only the modules imported by
the server (PRELOAD_*: those a new interpreter would import as well) are shared. There is one server per preload
list and environment; a server that dies, or whose request fails midway (a timeout, Ctrl-C), is killed with its
run's process group, and the next call starts a new one. Servers keep the runs' output under TEMP_ROOT (pytest's
basetemp, set by tests/conftest.py; the system's temporary directory if unset) until close_all().
"""

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "tests" / "cli_server.py"
# What a new `python -m mad.run` smoke run imports (python -X importtime): mad.run's imports, torch._dynamo (from the
# first optimizer step), Hydra's internals and every plugin it discovers, and the sweep-summary callback.
PRELOAD_CLI = ("mad.run", "torch._dynamo", "hydra._internal.hydra", "hydra._internal.utils", "mad.sweep_summary",
               "hydra_plugins.hydra_joblib_launcher.joblib_launcher",
               "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
               "hydra_plugins.mad_stacked_launcher.stacked_launcher")  # fmt: skip
PRELOAD_SCRIPT = ("torch",)  # the benchmark scripts choose TRITON_INTERPRET before they import triton
# pytest sets this variable anew for every test; the server's value of it is never read.
VOLATILE = ("PYTEST_CURRENT_TEST",)
TEMP_ROOT: Path | None = None


class ForkServer:
    """One tests/cli_server.py process that has imported `preload` in `env` (and so stands in only for runs in
    exactly that environment), with a directory for its log and its runs' output, removed by close()."""

    def __init__(self, env: dict, preload: tuple[str, ...]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fork-server-", dir=TEMP_ROOT))
        self.log = open(self.dir / "server.log", "w")
        server_env = env | {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}  # see tests/cli_server.py
        self.proc = subprocess.Popen([sys.executable, str(SERVER), *preload], env=server_env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log)  # fmt: skip
        self.buffer = b""
        self.count = 0
        self.ready = False

    def run(self, target: dict, args: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """Run `target` ({"module": name} or {"script": path}) with `args` in `cwd` and `env`, as a child."""
        self.count += 1
        out, err = self.dir / f"{self.count}.out", self.dir / f"{self.count}.err"
        args = [str(a) for a in args]
        command = [sys.executable, *(["-m", target["module"]] if "module" in target else [target["script"]]), *args]
        request = {**target, "args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        pid = None
        try:
            if not self.ready:
                reply = self._read(300)
                if reply != {"ready": True}:
                    raise RuntimeError(f"the test fork server did not start: {reply.get('error', reply)}")
                self.ready = True
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self._read(60)["pid"]
            try:
                returncode = self._read(timeout)["returncode"]
            except TimeoutError:
                raise subprocess.TimeoutExpired(command, timeout, _text(out), _text(err)) from None
        except BaseException:
            if pid is not None:
                _kill_group(pid)
            self.close()  # the replies may be out of step with the requests now
            raise
        stdout, stderr = out.read_text(), err.read_text()
        out.unlink()
        err.unlink()
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)

    def _read(self, timeout: float) -> dict:
        """The next reply; read from the pipe's descriptor (a buffered reader could hold a line select misses)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if not select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"the test fork server died; its log:\n{_text(self.dir / 'server.log')[-4000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Kill the server (its child, if any, was killed before) and remove its directory; idempotent."""
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):  # a request left in the buffer of a dead server's pipe
            self.proc.stdin.close()
        self.proc.stdout.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


_SERVERS: dict[tuple, ForkServer] = {}


def _server(env: dict, preload: tuple[str, ...]) -> ForkServer:
    key = (preload, tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE)))
    server = _SERVERS.get(key)
    if server is not None and server.proc.poll() is not None:
        server.close()
        server = None
    if server is None:
        server = _SERVERS[key] = ForkServer(env, preload)
    return server


def close_all() -> None:
    for server in _SERVERS.values():
        server.close()
    _SERVERS.clear()


def cli_env() -> dict:
    """The environment of run_cli's runs: this process's, with the repository importable and no data cache."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "2"}
    env.pop("MAD_DATA_CACHE", None)
    return env


def run_cli(args: list, cwd: Path, module: str = "mad.run", timeout: float = 600,
            fresh: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """`python -m <module> <args>` from `cwd` (so runs/ and the data cache land there) in cli_env(), forked from a
    server; `fresh`: in a new interpreter, imports and all (a few tests keep that path covered)."""
    env = cli_env()
    if fresh:
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    return _server(env, PRELOAD_CLI).run({"module": module}, args, cwd, env, timeout)


def run_script(script: str | Path, args: list, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """`python <script> <args>` from `cwd` in `env` (defaults: this process's), forked from a server."""
    env = dict(os.environ if env is None else env)
    cwd = Path.cwd() if cwd is None else cwd
    return _server(env, PRELOAD_SCRIPT).run({"script": str(script)}, args, cwd, env, timeout)
