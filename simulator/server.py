"""`sms-dispatch simulator`: one app served on HTTP and HTTPS from one process.

The Vonage SDK only speaks https://, the generic adapter and most tests speak http://; both
reach the same in-memory simulator, so a message sent on one port shows on the other."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

import structlog
import uvicorn
from litestar import Litestar

from shared.core.loops import new_event_loop
from shared.core.settings import Settings, get_settings
from simulator.app import create_app
from simulator.state import DROP_HEADER, Store
from simulator.tls import ensure_certificate

log = structlog.get_logger("simulator")

# Long enough for in-flight sends to finish; a scripted "timeout" is cut short.
GRACEFUL_SHUTDOWN_SECONDS = 5


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to SimulatorServer, which stops both at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SimulatorServer:
    """The simulator app on `host:port` (HTTP) and `host:tls_port` (HTTPS).

    The ports are bound when it is made (0 picks a free one; read `.port` and `.tls_port`), so
    a busy port fails here with OSError, before anything runs. `run()` serves until `stop()`
    (callable from any thread) or, in the main thread, SIGTERM/SIGINT."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int | None = None,
        tls_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.host = host or settings.simulator_host
        self.cert_file, self.key_file, self.ca_bundle = ensure_certificate(
            settings.simulator_tls_dir
        )
        self.app: Litestar = create_app(settings)
        self.started = threading.Event()
        self._http_socket = _bind(
            self.host, settings.simulator_port if port is None else port, "SMSD_SIMULATOR_PORT"
        )
        try:
            self._https_socket = _bind(
                self.host,
                settings.simulator_tls_port if tls_port is None else tls_port,
                "SMSD_SIMULATOR_TLS_PORT",
            )
        except OSError:
            self._http_socket.close()
            raise
        self.port: int = self._http_socket.getsockname()[1]
        self.tls_port: int = self._https_socket.getsockname()[1]
        served = dropping_connections(self.app)
        self._http = _Server(_config(served, self.host, self.port))
        self._https = _Server(
            _config(
                served,
                self.host,
                self.tls_port,
                ssl_certfile=str(self.cert_file),
                ssl_keyfile=str(self.key_file),
            )
        )
        for server in (self._http, self._https):
            server.config.load()  # a bad certificate fails here, not in a task

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://{self.host}:{self.tls_port}"

    def run(self) -> None:
        """Serve until stopped (blocks; runs its own event loop)."""
        # uvloop where installed, as uvicorn picks for the API: the simulator answers every
        # send and posts two callbacks for each.
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(self.serve())

    def stop(self, force: bool = False) -> None:
        """Ask both servers to stop; `force` drops open connections at once."""
        for server in (self._http, self._https):
            server.should_exit = True
            server.force_exit = server.force_exit or force

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
                handled.append(signum)
        servers = [(self._https, self._https_socket), (self._http, self._http_socket)]
        tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
        try:
            while not all(server.started for server, _ in servers):
                if any(task.done() for task in tasks):
                    self.stop()
                    break
                await asyncio.sleep(0.01)
            else:
                log.info("simulator.listening", http=self.url, https=self.tls_url)
                self.started.set()
            await asyncio.gather(*tasks)
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            for sock in (self._http_socket, self._https_socket):
                sock.close()
            await self._store().aclose()
            log.info("simulator.stopped")

    def _on_signal(self, signum: signal.Signals) -> None:
        # A second Ctrl-C stops at once, as uvicorn does.
        again = self._http.should_exit and signum == signal.SIGINT
        log.info("simulator.stopping", signal=signum.name, force=again)
        self.stop(force=again)

    def _store(self) -> Store:
        store: Store = self.app.state.store
        return store


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_DROP = DROP_HEADER.encode()
_RESET = b"reset"


def _reset(transport: Any) -> None:
    """Close with a TCP RST rather than a FIN (SO_LINGER 0, then abort): what a peer or a
    middlebox that lost the connection's state does; the client reads ECONNRESET."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def dropping_connections(app: Callable[..., Awaitable[None]]) -> ASGIApp:
    """`app`, but a response marked with DROP_HEADER (the `drop_connection` and
    `reset_after_accept` scripts) is never sent: the connection is closed with the request
    read and no answer, which clients see as RemoteDisconnected (or, reset, as ECONNRESET),
    the case where an SDK might send the same request again.

    ASGI has no way to close a connection, so this reaches uvicorn's transport through its
    `send`; a server without one gets the answer instead."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def guarded(message: Message) -> None:
            drop = None
            if message["type"] == "http.response.start":
                drop = next(
                    (value for name, value in message.get("headers", ()) if name.lower() == _DROP),
                    None,
                )
            if drop is not None:
                cycle = getattr(send, "__self__", None)
                transport = getattr(cycle, "transport", None)
                if transport is not None:
                    log.info("simulator.connection_dropped", path=scope.get("path"), how=drop)
                    if drop == _RESET:
                        _reset(transport)
                    else:
                        transport.close()
                    # uvicorn answers 500 to an app that never started its response, unless
                    # it has seen the connection go: wait until it has.
                    for _ in range(200):
                        if getattr(cycle, "disconnected", True):
                            break
                        await asyncio.sleep(0.005)
                    return
            await send(message)

        await app(scope, receive, guarded)

    return wrapped


def _config(
    app: ASGIApp,
    host: str,
    port: int,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_config=None,
        access_log=False,
        # The app's lifespan is SimulatorServer's to run, once, not once per server.
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def _bind(host: str, port: int, setting: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they
    # are TCP, and without it every answer waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # As uvicorn binds: a port only in TIME_WAIT after a restart is free, a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot listen on {host}:{port} ({exc.strerror}); set {setting}"
        ) from exc
    sock.set_inheritable(False)
    return sock


def serve(settings: Settings | None = None) -> None:
    """Serve the simulator on settings.simulator_host: simulator_port (HTTP) and
    simulator_tls_port (HTTPS, certificate in simulator_tls_dir) until SIGTERM or SIGINT."""
    SimulatorServer(settings or get_settings()).run()


if __name__ == "__main__":
    # `sms-dispatch simulator` runs this module (shared/ never imports the simulator). A busy
    # port is one line on stderr and exit code 1, as the command's click error was.
    try:
        serve()
    except OSError as exc:
        raise SystemExit(f"Error: {exc}") from None
