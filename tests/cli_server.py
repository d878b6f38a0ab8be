"""The server side of tests/forked_python.py: one process that imports modules once, then forks a child for each
`python -m <module> <args>` or `python <script> <args>` it is asked to run.

    python tests/cli_server.py MODULE...    # imports each MODULE, then serves requests on stdin

Start-up: each MODULE is imported; one that fails to import is logged (stderr: the server log) and left for the
children to import themselves. The server then checks that forking is safe: no thread but the main one, CUDA not
initialised, and a forked child can run a small torch op and its backward (within 10 s). It replies
{"ready": true}, or {"error": <why>} and exits. It must be started with PYTORCH_NVML_BASED_CUDA_CHECK=1, so that
an import that asks `torch.cuda.is_available()` does not initialise CUDA.

Protocol (one JSON object a line): a request {"module" or "script", "args", "cwd", "env", "stdout", "stderr"} on
stdin; the replies {"pid"} as the child starts and {"returncode"} as it ends (negative: killed by that signal, as
subprocess reports). The server runs one request at a time and exits at the end of stdin.

The child does what `python -m <module>` or `python <script>` does after start-up: its own process group (so that
a timeout can kill it with its workers), the request's cwd and environment, stdin from /dev/null, stdout and stderr
to the request's files, fresh random seeds (torch, random, numpy: a new interpreter seeds them from the OS), the
warnings shown once forgotten, `sys.argv` and `sys.path[0]` (none prepended under PYTHONSAFEPATH), the module
(dropped from sys.modules first, as `python -m` finds it absent) or script run as `__main__`, then the
interpreter's exit: an uncaught exception to `sys.excepthook`, non-daemon threads joined, atexit handlers, streams
flushed, and the exit status (SystemExit's code; 1 after an uncaught exception; killed by SIGINT after an uncaught
KeyboardInterrupt). What it cannot undo: the server's imports, and the hash seed, fixed per server.
"""

import json
import os
import sys
import threading
import traceback


def child(request: dict, reply_fd: int) -> None:
    """Run `request` as a new interpreter would, then exit; never returns."""
    import atexit
    import runpy
    import signal
    import warnings

    code, interrupted = 1, False
    try:
        os.setpgid(0, 0)
        os.close(reply_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # Each path is opened onto its descriptor (0-2 stay open meanwhile, so a new file never lands on one).
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], write),
                                (2, request["stderr"], write)):  # fmt: skip
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(os.devnull)
        reseed()
        warnings._filters_mutated()  # forget the warnings the server's imports showed once, as a new process would
        try:
            if "script" in request:
                script = os.path.abspath(request["script"])  # __main__.__file__ is absolute, as in Python >= 3.9
                sys.argv = [request["script"], *request["args"]]
                if not sys.flags.safe_path:
                    sys.path[0] = os.path.dirname(script)  # `python <script>` puts the script's directory first
                runpy.run_path(script, run_name="__main__")
            else:
                module = request["module"]
                sys.argv = ["-m", *request["args"]]
                if not sys.flags.safe_path:
                    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
                for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
                    del sys.modules[name]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
            sys.excepthook(*sys.exc_info())
        threading._shutdown()  # as at interpreter exit: join non-daemon threads, then atexit handlers
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a failure of the emulation itself
        code = 1
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        if interrupted:  # as the interpreter after an uncaught KeyboardInterrupt: die of SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)  # as the interpreter: sys.exit(-1) exits 255


def reseed() -> None:
    """Seed the global generators of the imported random libraries from the OS, as a new interpreter does."""
    if "torch" in sys.modules:
        sys.modules["torch"].default_generator.seed()
    if "random" in sys.modules:
        sys.modules["random"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def fork_problem() -> str | None:
    """Why forking this process is unsafe, or None: threads (a child gets only the forking one, locks held by the
    others stay held), an initialised CUDA context, or a child that cannot run a small torch op and its backward."""
    if threading.active_count() != 1:
        return f"threads running after the imports: {[t.name for t in threading.enumerate()]}"
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if torch.cuda.is_initialized():
        return "CUDA was initialised by the imports (was the server started with PYTORCH_NVML_BASED_CUDA_CHECK=1?)"
    pid = os.fork()
    if pid == 0:
        import signal

        signal.alarm(10)  # a deadlocked thread pool: killed by SIGALRM
        x = torch.randn(256, 256, requires_grad=True)
        (x @ x).tanh().sum().backward()
        os._exit(0)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return None if status == 0 else f"a forked child's torch op and backward ended with status {status}"


def serve(preload: list[str]) -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the imports print goes to the log, not into the replies

    def send(message: dict) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    for name in preload:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - then each child imports it itself (and fails as a new interpreter would)
            print(f"preload of {name} failed; the children import it themselves:", file=sys.stderr)
            traceback.print_exc()
    problem = fork_problem()
    if problem is not None:
        send({"error": f"forking this server is unsafe: {problem}"})
        sys.exit(1)
    send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request, reply.fileno())
        send({"pid": pid})
        send({"returncode": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])})


if __name__ == "__main__":
    serve(sys.argv[1:])
