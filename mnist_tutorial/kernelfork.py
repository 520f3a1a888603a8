"""Jupyter kernels forked from a process that has already imported torch: a fork server.

Every notebook of a run gets a fresh kernel, as with papermill alone. Booting one costs a new
Python that imports ipykernel, torch, caffe2torch's ops and matplotlib: about 2 CPU seconds, five
times per run, which on a 2-core machine is most of what run_all.py costs over plain Python. The
fork server pays for those imports once; each kernel is then an ``os.fork()`` of it that runs
ipykernel's launcher exactly as ``python -m ipykernel_launcher -f CONNECTION_FILE ...`` would, in
its own session, working directory and environment. Nothing runs in the server before a fork but
imports (no notebook code, no torch operation, no CUDA), so every kernel starts from the same
clean state a new process would have, minus the import time.

Two parts:

- the server, ``python -m mnist_tutorial.kernelfork FD STAGES_JSON``: runs each stage (import
  code) in order and answers fork requests on the socket FD once the stage a request names is
  loaded, so the light kernel of the download step is forked before torch is imported. It
  refuses to fork if anything started a thread (forking threads is unsafe), reaps its kernels and
  reports their exit status, and exits when the runner closes the socket.
- the runner's side: ``ForkServer`` (starts the server, sends requests, reads replies in a thread)
  and ``ForkProvisioner``, a jupyter_client provisioner whose kernel process is a fork. When the
  server cannot fork (a stage failed, a thread appeared, the server died) the kernel is launched
  the usual way, so a run never fails because of the fork server.
"""
import json
import os
import select
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


def _become_kernel(fds, request):
    """In the forked child: the kernel process ``request`` asks for; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in fds:  # the server's socket and exits pipe
            os.close(fd)
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


def serve(fd, exits_fd, stages):
    """The fork server's main loop; ``stages`` is a list of [name, import code, hold].

    Requests and answers are JSON lines on the socket ``fd``. Exits of kernels are reported as
    ``PID CODE`` lines on the pipe ``exits_fd`` by the SIGCHLD handler, which runs between any two
    bytecodes, so a kernel's exit is known at once even while a stage is importing torch (one
    short write: atomic on a pipe, never interleaved with the socket's messages).
    """
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle

    def reap(*_):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                os.write(exits_fd, f"{pid} {os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass  # the runner is gone

    signal.signal(signal.SIGCHLD, reap)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # as ipykernel_launcher does; IPython puts the kernel's cwd back
    loaded, failed, pending, buffer = set(), {}, [], b""
    names = [name for name, _, _ in stages]

    def answer(request):
        stage = request["stage"]
        if stage in failed:
            _send(sock, {"id": request["id"], "error": failed[stage]})
            return
        threads = _python_threads()
        if threads:
            _send(sock, {"id": request["id"], "error": f"stage {stage} left {threads} Python "
                         "thread(s) running; forking is unsafe"})
            return
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            _send(sock, {"id": request["id"], "error": f"stage {stage} initialized CUDA, which a "
                         "forked process cannot use"})
            return
        for stream in (sys.stdout, sys.stderr):  # nothing buffered gets written twice
            stream.flush()
        pid = os.fork()
        if pid == 0:
            _become_kernel((sock.fileno(), exits_fd), request)
        _send(sock, {"id": request["id"], "pid": pid})

    def handle(blocking):
        """Read what the runner sent; False once it has closed the socket."""
        nonlocal buffer
        readable, _, _ = select.select([sock], [], [], None if blocking else 0)
        if readable:
            data = sock.recv(1 << 20)
            if not data:
                return False
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if request.get("stage") not in names:
                    _send(sock, {"id": request.get("id"), "error": "unknown stage "
                                 f"{request.get('stage')!r}"})
                else:
                    pending.append(request)
        return True

    served = set()  # stages that have had a kernel forked (or refused)

    def serve_ready():
        for request in [r for r in pending if r["stage"] in loaded or r["stage"] in failed]:
            pending.remove(request)
            answer(request)
            served.add(request["stage"])

    open_ = True
    for name, code, hold in stages:
        try:
            exec(compile(code, f"<fork server stage {name}>", "exec"), {"__name__": "__stage__"})
            loaded.add(name)
        except BaseException as e:  # noqa: BLE001 - a failed stage means "launch normally"
            failed[name] = f"stage {name} failed: {type(e).__name__}: {' '.join(str(e).split())}"
            for later, _, _ in stages[names.index(name) + 1:]:
                failed[later] = failed[name]
        _send(sock, {"stage": name, "ok": name in loaded, "error": failed.get(name)})
        open_ = open_ and handle(blocking=False)
        serve_ready()
        # hold: a kernel of this stage is wanted first (the runner said so): fork it before
        # spending the CPU on the next stage's imports
        while open_ and hold and name in loaded and name not in served:
            open_ = handle(blocking=True)
            serve_ready()
        if failed or not open_:
            break
    while open_:
        open_ = handle(blocking=True)
        serve_ready()


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

    @property
    def pid(self):
        return self.wait_started()

    def poll(self):
        """None while the kernel runs (or is being forked), else its exit code."""
        if self.returncode is not None:
            return self.returncode
        if not self._ready.is_set():
            return None
        if self._popen is not None:
            self.returncode = self._popen.poll()
        elif self._pid is not None:
            self.returncode = self._server.exit_code(self._pid)
        return self.returncode

    def wait(self, timeout=None):
        """Block until the kernel has exited; its exit code."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                import subprocess
                raise subprocess.TimeoutExpired("forked kernel", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum):
        """Signal the kernel's process group (it leads its own session)."""
        pid = self.wait_started(timeout=60)
        if pid is None or self.poll() is not None:
            return
        try:
            os.killpg(pid, signum)
        except OSError:
            os.kill(pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """The runner's end of a fork server process (see the module docstring)."""

    def __init__(self, python_argv, stages, env=None, cwd=None):
        import subprocess
        ours, theirs = socket.socketpair()
        exits_r, exits_w = os.pipe()
        self._stage_names = [name for name, _, _ in stages]
        self._sock = ours
        self._exits_r = exits_r
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting = {}  # request id -> ForkedKernel
        self._exits = {}  # pid -> exit code
        self.stages = {}  # stage name -> the server's report
        self.closed = False
        try:
            self.process = subprocess.Popen(
                [*python_argv, "-m", "mnist_tutorial.kernelfork", str(theirs.fileno()),
                 str(exits_w), json.dumps(stages)], pass_fds=[theirs.fileno(), exits_w],
                stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        except BaseException:
            ours.close()
            os.close(exits_r)
            raise
        finally:
            theirs.close()
            os.close(exits_w)
        self._reader = threading.Thread(target=self._read, name="kernelfork-reader", daemon=True)
        self._reader.start()

    def _read(self):
        """The reader thread: answers and stage reports from the socket, exits from the pipe."""
        import selectors
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ, "socket")
        selector.register(self._exits_r, selectors.EVENT_READ, "exits")
        buffers = {"socket": b"", "exits": b""}
        while selector.get_map():
            for key, _ in selector.select():
                try:
                    data = (self._sock.recv(1 << 16) if key.data == "socket"
                            else os.read(self._exits_r, 1 << 16))
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    if key.data == "socket":
                        self._server_gone()
                    continue
                buffers[key.data] += data
                while b"\n" in buffers[key.data]:
                    line, buffers[key.data] = buffers[key.data].split(b"\n", 1)
                    if key.data == "socket":
                        self._dispatch(json.loads(line))
                    else:
                        pid, code = map(int, line.split())
                        with self._lock:
                            self._exits[pid] = code
        selector.close()
        os.close(self._exits_r)

    def _server_gone(self):
        with self._lock:
            self.closed = True
            waiting, self._waiting = list(self._waiting.values()), {}
        for kernel in waiting:
            kernel._fallback("the fork server exited")

    def _dispatch(self, message):
        if "stage" in message:
            self.stages[message["stage"]] = message
            return
        with self._lock:
            kernel = self._waiting.pop(message.get("id"), None)
        if kernel is None:
            return
        if "pid" in message:
            kernel._forked(message["pid"])
        else:
            kernel._fallback(message.get("error") or "no reason given")

    def exit_code(self, pid):
        """A forked kernel's exit code, or None while it runs."""
        with self._lock:
            if pid in self._exits:
                return self._exits[pid]
            server_gone = self.closed
        if server_gone:  # nobody reaps it any more: an orphan, adopted by init
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return 0
        return None

    def request(self, stage, args, env, cwd, launch):
        """Ask for a kernel forked after ``stage``; returns its ForkedKernel at once."""
        kernel = ForkedKernel(self, launch)
        if stage not in self._stage_names:
            kernel._fallback(f"the fork server has no stage {stage!r}")
            return kernel
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
            _send(self._sock, {"id": rid, "stage": stage, "args": args, "env": env, "cwd": cwd})
        except OSError as e:
            with self._lock:
                self._waiting.pop(rid, None)
            kernel._fallback(f"cannot reach the fork server: {e}")
        return kernel

    def close(self, timeout=5):
        """Stop the server (its kernels should be shut down first)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the server sees EOF and exits
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except Exception:  # noqa: BLE001
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


def provisioner_class():
    """ForkProvisioner, defined on first use so that importing this module needs no Jupyter."""
    global ForkProvisioner
    if ForkProvisioner is not None:
        return ForkProvisioner
    from jupyter_client.launcher import launch_kernel
    from jupyter_client.provisioning import LocalProvisioner

    class _ForkProvisioner(LocalProvisioner):
        """LocalProvisioner whose kernel process comes from a ForkServer (see the module)."""

        server = None  # set by the runner before start_kernel
        stage = None

        async def launch_kernel(self, cmd, **kwargs):
            """Ask the server for the kernel; launch it normally when the command is unusual."""
            split = launcher_command(cmd)
            scrubbed = LocalProvisioner._scrub_kwargs(kwargs)
            if split is None or self.server is None:
                return await super().launch_kernel(cmd, **kwargs)
            env = dict(scrubbed.get("env") or os.environ)
            cwd = str(scrubbed.get("cwd") or os.getcwd())
            self.process = self.server.request(
                self.stage, split[1], env, cwd, lambda: launch_kernel(cmd, **scrubbed))
            self.pid = None  # known once the server answers; signals go through the process
            self.pgid = None
            self.cwd = cwd
            return self.connection_info

        async def send_signal(self, signum):
            if isinstance(self.process, ForkedKernel):
                self.process.send_signal(signum)
                return
            await super().send_signal(signum)

    ForkProvisioner = _ForkProvisioner
    return ForkProvisioner


ForkProvisioner = None


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
