"""A kernel provisioner that forks Jupyter kernels from a process that has imported torch.

Every notebook gets a fresh kernel, as with papermill alone. Booting one costs a new Python that
imports ipykernel, torch, caffe2torch's ops and matplotlib: about 2 CPU seconds, five times per
run. The fork server pays for those imports once; each kernel is then an ``os.fork()`` of it that
runs ipykernel's launcher exactly as ``python -m ipykernel_launcher -f CONNECTION_FILE ...`` would,
in its own session, working directory and environment. Nothing runs in the server before a fork
but imports (no notebook code, no torch operation, no CUDA).

jupyter_client finds ``ForkProvisioner`` through the entry point group
``jupyter_client.kernel_provisioners`` (name ``caffe2torch-fork``) when a kernelspec's metadata
names it (``pipeline/kernel/kernel.json``, which `make kernel` installs): Jupyter Lab, papermill
and run_all.py all get it the same way. One server per Python, preload and environment lives as
long as the process that started it (Jupyter's server, run_all.py). When the server cannot fork
(its preload failed, it left a thread running, it died) the kernel is launched the usual way, so
nothing fails because of it. ``CAFFE2TORCH_FORK_KERNELS=0`` turns forking off.
"""
import collections
import contextlib
import json
import os
import signal
import socket
import sys
import threading

# --- the server --------------------------------------------------------------------------------


def _python_threads():
    """Python threads besides the main one: forking while one runs is unsafe (locks it holds stay
    held in the child). Native pools that libraries start at import, such as numpy's OpenBLAS,
    stop themselves around fork (pthread_atfork), as they must for multiprocessing's fork."""
    return threading.active_count() - 1


def _send(sock, message):
    sock.sendall((json.dumps(message) + "\n").encode())


def _become_kernel(fd, request):
    """In the forked child: the kernel process ``request`` asks for; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.close(fd)  # the server's socket
        os.setsid()  # its own process group, as jupyter_client's launcher gives a kernel
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # ipykernel exits when its parent goes: the parent is this server, which lives as long
        # as the runner does
        os.environ["JPY_PARENT_PID"] = str(os.getppid())
        import random
        random.seed()  # the server's generator state is shared by every fork
        import importlib.util

        from ipykernel import kernelapp
        # traitlets read JPY_PARENT_PID when the server imported ipykernel: say it again here
        sys.argv = [importlib.util.find_spec("ipykernel_launcher").origin, *request["args"],
                    f"--IPKernelApp.parent_handle={os.getppid()}"]
        kernelapp.launch_new_instance()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, then leave without unwinding
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve(fd, preload):
    """The fork server's main loop: run ``preload`` (import code), then fork kernels on request.

    Requests and answers are JSON lines on the socket ``fd``. Kernels that exit are reaped at
    once (SIGCHLD): the parent sees them gone.
    """
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def reap(*_):
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    signal.signal(signal.SIGCHLD, reap)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # as ipykernel_launcher does; IPython puts the kernel's cwd back
    failed = None
    try:
        exec(compile("import ipykernel.kernelapp, IPython\n" + preload, "<fork server preload>",
                     "exec"), {"__name__": "__preload__"})
    except BaseException as e:  # noqa: BLE001 - a failed preload means "launch normally"
        failed = f"its preload failed: {type(e).__name__}: {' '.join(str(e).split())}"
    _send(sock, {"ready": failed is None, "error": failed})

    def answer(request):
        threads = _python_threads()
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_initialized()
        why = failed or (f"its preload left {threads} Python thread(s) running; forking is unsafe"
                         if threads else "its preload initialized CUDA, which a forked process "
                         "cannot use" if cuda else None)
        if why:
            _send(sock, {"id": request["id"], "error": why})
            return
        for stream in (sys.stdout, sys.stderr):  # nothing buffered gets written twice
            stream.flush()
        pid = os.fork()
        if pid == 0:
            _become_kernel(sock.fileno(), request)
        _send(sock, {"id": request["id"], "pid": pid})

    buffer = b""
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return  # the parent closed the socket
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            answer(json.loads(line))


# --- the runner's side -------------------------------------------------------------------------


class ForkedKernel:
    """A Popen-like handle on one kernel: forked by the server, or launched normally instead.

    ``launch`` is called with no arguments to launch the kernel the usual way (a Popen) when the
    server answers with an error or goes away before answering.
    """

    stdin = stdout = stderr = None

    def __init__(self, server, launch):
        self._server = server
        self._launch = launch
        self._ready = threading.Event()
        self._pid = None
        self._popen = None
        self.returncode = None
        self._signalled = None
        self.forked = None  # True: a fork; False: launched normally
        self.why_not_forked = None

    # called by ForkServer's reader thread
    def _forked(self, pid):
        self._pid, self.forked = pid, True
        self._ready.set()

    def _fallback(self, why):
        self.forked = False
        self.why_not_forked = why
        try:
            self._popen = self._launch()
            self._pid = self._popen.pid
        except Exception as e:  # noqa: BLE001 - reported through poll() as a dead kernel
            self.why_not_forked += f"; starting it as a new process failed too: {e}"
            self.returncode = 1
        self._ready.set()

    def wait_started(self, timeout=None):
        """The kernel's pid once it exists (None if it could not be launched at all)."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the fork server did not answer")
        return self._pid

    def poll(self):
        """None while the kernel runs (or is being forked), else its exit code."""
        if self.returncode is not None:
            return self.returncode
        if not self._ready.is_set():
            return None
        if self._popen is not None:
            self.returncode = self._popen.poll()
        elif self._pid is not None:
            try:
                os.kill(self._pid, 0)  # the server reaps its kernels: a dead one is gone
            except ProcessLookupError:
                # its status went to the server; what we know: the signal we sent it
                self.returncode = -self._signalled if self._signalled else 0
        return self.returncode

    def wait(self, timeout=None):
        """The exit code (LocalProvisioner calls this once poll() has one)."""
        return self.poll()

    def send_signal(self, signum):
        """Signal the kernel's process group (it leads its own session)."""
        pid = self.wait_started(timeout=60)
        if pid is None or self.poll() is not None:
            return
        if signum in (signal.SIGKILL, signal.SIGTERM):
            self._signalled = signum
        try:
            os.killpg(pid, signum)
        except OSError:
            os.kill(pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """The parent's end of a fork server process (see the module docstring)."""

    def __init__(self, python_argv, preload, env=None):
        import subprocess
        self._sock, theirs = socket.socketpair()
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting = {}  # request id -> ForkedKernel
        self.ready = None  # the server's report once its preload ran
        self.closed = False
        try:
            self.process = subprocess.Popen(
                [*python_argv, "-m", "pipeline.kernelfork", str(theirs.fileno()), preload],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            self._sock.close()
            raise
        finally:
            theirs.close()
        self._reader = threading.Thread(target=self._read, name="kernelfork-reader", daemon=True)
        self._reader.start()

    def _read(self):
        """The reader thread: the server's answers, until it closes the socket."""
        with contextlib.suppress(OSError), self._sock.makefile("rb") as lines:
            for line in lines:
                self._dispatch(json.loads(line))
        with self._lock:
            self.closed = True
            waiting, self._waiting = list(self._waiting.values()), {}
        for kernel in waiting:
            kernel._fallback("the fork server exited")

    def _dispatch(self, message):
        if "ready" in message:
            self.ready = message
            return
        with self._lock:
            kernel = self._waiting.pop(message.get("id"), None)
        if kernel is None:
            return
        if "pid" in message:
            kernel._forked(message["pid"])
        else:
            kernel._fallback(message.get("error") or "no reason given")

    def request(self, args, env, cwd, launch):
        """Ask for a forked kernel; returns its ForkedKernel at once (``launch``: the fallback)."""
        kernel = ForkedKernel(self, launch)
        with self._lock:
            closed = self.closed
            if not closed:
                self._next_id += 1
                rid = self._next_id
                self._waiting[rid] = kernel
        if closed:
            kernel._fallback("the fork server is not running")
            return kernel
        try:
            _send(self._sock, {"id": rid, "args": args, "env": env, "cwd": cwd})
        except OSError as e:
            with self._lock:
                self._waiting.pop(rid, None)
            kernel._fallback(f"cannot reach the fork server: {e}")
        return kernel

    def close(self, timeout=5):
        """Stop the server (its kernels should be shut down first)."""
        if self.ready is None:  # still importing (a run that ended early): nothing to finish
            self.process.kill()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the server sees EOF and exits
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except Exception:  # noqa: BLE001 - still importing: it has nothing to finish
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout)
        self._sock.close()


def launcher_command(argv):
    """Split a kernelspec argv of the form ``PYTHON [OPTIONS] -m ipykernel_launcher ARGS`` into
    (``[PYTHON, OPTIONS...]``, ``ARGS``); None for any other form (no forking then)."""
    for i in range(1, len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "ipykernel_launcher":
            options = argv[1:i]
            if all(o.startswith("-") and o not in ("-c", "-m") for o in options):
                return argv[:i], argv[i + 2:]
            return None
    return None


NAME = "caffe2torch-fork"  # the entry point's name, in kernelspecs' metadata
DISABLE = "CAFFE2TORCH_FORK_KERNELS"  # "0": launch every kernel as a new process
_servers = {}  # (python argv, preload, environment) -> ForkServer
_servers_lock = threading.Lock()
_launches = collections.deque(maxlen=1)  # the last ForkedKernel, or None: a normal launch


def _env_key(env):
    # jupyter_server and jupyter_client set JPY_* per kernel; the rest is what the imports saw
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith("JPY_")
                        and k != DISABLE))


def server_for(python_argv, preload, env):
    """The fork server for this Python, preload and environment, started on first use."""
    key = (tuple(python_argv), preload, _env_key(env))
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.closed:
            if not _servers:
                import atexit
                atexit.register(close_all)
            server = _servers[key] = ForkServer(
                python_argv, preload, env={k: v for k, v in env.items()
                                           if not k.startswith("JPY_")})
        return server


def close_all(timeout=1):
    """Stop every fork server this process started (at exit: forked kernels are gone by then)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close(timeout)


def _config(kernel_spec):
    provisioner = (getattr(kernel_spec, "metadata", None) or {}).get("kernel_provisioner") or {}
    if provisioner.get("provisioner_name") != NAME:
        return None
    return provisioner.get("config") or {}


def warm(kernel_spec):
    """Start the fork server that ``kernel_spec``'s kernels will use, so that its imports run
    while the caller does other work; nothing when the kernelspec names another provisioner."""
    config = _config(kernel_spec)
    argv = list(kernel_spec.argv)
    if argv and argv[0] in {"python", f"python{sys.version_info[0]}",
                            "python{}.{}".format(*sys.version_info[:2])}:
        argv[0] = sys.executable  # as jupyter_client's KernelManager.format_kernel_cmd does
    split = launcher_command(argv)
    if config is None or split is None or os.environ.get(DISABLE) == "0":
        return None
    try:
        return server_for(split[0], config.get("preload", ""), dict(os.environ))
    except OSError as e:
        print(f"kernelfork: cannot start the kernel fork server ({e})", file=sys.stderr)
        return None


def last_launch(timeout=60):
    """How the last kernel started in this process came to be: "forked", "new process" (the
    reason is printed on stderr when forking was tried), or None when none was started."""
    if not _launches:
        return None
    process = _launches[-1]
    if process is None:
        return "new process"
    with contextlib.suppress(TimeoutError):
        process.wait_started(timeout=timeout)
    if process.forked:
        return "forked"
    print(f"kernelfork: the kernel was started as a new process, not forked: "
          f"{process.why_not_forked}", file=sys.stderr, flush=True)
    return "new process"


from jupyter_client.launcher import launch_kernel  # noqa: E402  (after the server's code)
from jupyter_client.provisioning import LocalProvisioner  # noqa: E402
from traitlets import Unicode  # noqa: E402


class ForkProvisioner(LocalProvisioner):
    """LocalProvisioner whose kernel process is forked from a fork server (see the module).

    Its kernelspec says ``"metadata": {"kernel_provisioner": {"provisioner_name":
    "caffe2torch-fork", "config": {"preload": "import torch"}}}``.
    """

    preload = Unicode("", config=True, help="Python code the fork server runs before any fork: "
                      "imports only")

    async def launch_kernel(self, cmd, **kwargs):
        """Ask the fork server for the kernel; launch it normally when that cannot work."""
        split = launcher_command(cmd)
        scrubbed = LocalProvisioner._scrub_kwargs(kwargs)
        env = dict(scrubbed.get("env") or os.environ)
        if split is None or os.environ.get(DISABLE) == "0" or env.get(DISABLE) == "0":
            connection = await super().launch_kernel(cmd, **kwargs)
            _launches.append(None)
            return connection
        cwd = str(scrubbed.get("cwd") or os.getcwd())
        try:
            server = server_for(split[0], self.preload, env)
        except OSError as e:
            server = None
            why = f"cannot start the fork server: {e}"
        if server is None:
            self.process = ForkedKernel(None, lambda: launch_kernel(cmd, **scrubbed))
            self.process._fallback(why)
        else:
            self.process = server.request(split[1], env, cwd,
                                          lambda: launch_kernel(cmd, **scrubbed))
        _launches.append(self.process)
        self.pid = None  # known once the server answers; signals go through the process
        self.pgid = None
        self.cwd = cwd
        return self.connection_info

    async def send_signal(self, signum):
        """Signal the kernel's process group (a fork leads its own session)."""
        if isinstance(self.process, ForkedKernel):
            self.process.send_signal(signum)
            return
        await super().send_signal(signum)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
