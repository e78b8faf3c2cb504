"""The Envoy data plane under Kiln's control: config files, validation, runtime weights, supervision.

* Start: render the bootstrap and the xDS files (CDS, RDS) from the gateway config and the live
  route table, validate them with ``envoy --mode validate``, start Envoy, read the bound port.
* Route changes: the table calls ``check`` before it swaps (a structural change whose config Envoy
  refuses is refused whole, naming the route; the running config is untouched) and ``apply``
  after. Weights and shadow fractions go through Envoy's runtime layer (one ``/runtime_modify``,
  effective for the next request); structural changes rewrite the xDS files by atomic rename
  (clusters before the routes that use them, unused clusters after) and wait for Envoy's ack.
* Envoy dies: the supervisor rewrites the files from the current routes and restarts it; runtime
  weights are re-applied (they are also the files' defaults).
* Per-variant figures: Envoy's access log -> ``EnvoyMetrics`` (``access_log.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from core.atomic_file import write_atomic
from core.errors import InvalidInputError, KilnError, UnavailableError
from server.gateway.config import GatewayConfig, Route, route_to_dict
from server.gateway.envoy import render
from server.gateway.envoy.access_log import AccessLogReader, EnvoyMetrics, Record
from server.gateway.envoy.admin import EnvoyAdmin
from server.gateway.envoy.binary import EnvoyBinary
from server.gateway.envoy.descriptor import descriptor_set
from server.gateway.envoy.local import Comparator, start_local_server
from server.gateway.envoy.process import EnvoyProcess, ExternalEnvoy, ProcessSettings
from server.gateway.resilience import OutlierDetector
from server.gateway.routing import PIN_HEADER
from server.gateway.serve_threads import ThreadHandlers
from server.gateway.shadow import ShadowSender
from server.gateway.table import RouteChange, RoutesSnapshot, RouteTable
from server.gateway.upstreams import UpstreamPool
from server.gateway.wire import encode_string_field

logger = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
_CDS_VERSION = "cluster_manager.cds.version_text"
_RDS_VERSION = f"http.{render.STAT_PREFIX}.rds.{render.ROUTE_CONFIG}.version_text"
_COMPLETED = f"http.{render.STAT_PREFIX}.downstream_rq_completed"


@dataclass(frozen=True)
class EnvoyOptions:
    binary: EnvoyBinary
    workers: int = 1  # Envoy worker threads
    directory: Path | None = None  # config, xDS files and logs; default: a fresh temporary directory
    external_admin: str | None = None  # "127.0.0.1:9901": Envoy runs beside Kiln (deploy/), not started by it


def route_shape(route: Route) -> dict[str, Any]:
    """A route without its weights and shadow fraction (those go through Envoy's runtime layer)."""
    data = route_to_dict(route)
    data["closed"] = sorted(v.name for v in route.variants if v.weight == 0)  # their pins go to Kiln
    for variant in data["variants"]:
        variant.pop("weight", None)
    if data.get("shadow"):
        data["shadow"].pop("percent", None)
    return data


def structure(routes: Mapping[str, Route]) -> str:
    """What needs new Envoy config when it changes: everything but weights and shadow fractions."""
    return json.dumps({public: route_shape(route) for public, route in sorted(routes.items())}, sort_keys=True)


def only_removes(current: Mapping[str, Route], routes: Mapping[str, Route]) -> bool:
    """True when ``routes`` only drops routes, variants or shadows of ``current`` and keeps each
    baseline (e.g. a rollback): the config keeps a subset of what Envoy already runs, so it needs no
    new validation and its files can be written after the runtime weights moved the traffic."""
    for public, route in routes.items():
        if public not in current:
            return False
        old, new = route_shape(current[public]), route_shape(route)
        if old == new:
            continue
        if any(v not in old["variants"] for v in new["variants"]) or new.get("sticky") != old.get("sticky"):
            return False
        if new["variants"][0] != old["variants"][0]:  # a new baseline answers the control methods: push now
            return False
        if new.get("shadow") and new.get("shadow") != old.get("shadow"):
            return False
    return True


def validate_config(binary: EnvoyBinary, bootstrap: dict[str, Any], directory: Path) -> str | None:
    """None when ``envoy --mode validate`` accepts ``bootstrap``, else Envoy's reason."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=directory, delete=False) as handle:
        json.dump(bootstrap, handle)
    try:
        done = subprocess.run(
            [str(binary.path), "--mode", "validate", "-c", handle.name, "--disable-hot-restart", "-l", "error"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    reasons = [line for line in lines if "error" in line.lower() or "exception" in line.lower()] or lines
    return (reasons[-1] if reasons else f"exit code {done.returncode}")[-600:]


class EnvoyPlane:
    def __init__(
        self, config: GatewayConfig, table: RouteTable, metrics: EnvoyMetrics, options: EnvoyOptions,
        host: str, port: int, python: ThreadHandlers | None = None, health: OutlierDetector | None = None,
        local_handlers: Sequence[grpc.GenericRpcHandler] = (), health_servicer: Any = None,
    ) -> None:  # fmt: skip
        """``python``: the Python data plane's handlers, for what Envoy hands to Kiln's local server;
        ``health``: upstream ejections; ``local_handlers``/``health_servicer``: served by Kiln's local
        server, which Envoy routes control RPCs and ``grpc.health.v1`` to."""
        self._config = config
        self._python = python
        self._local_handlers = tuple(local_handlers)
        self._health_servicer = health_servicer
        self._table = table
        self._metrics = metrics
        self._options = options
        self._own_directory = options.directory is None
        directory = Path(tempfile.mkdtemp(prefix="kiln-envoy-")) if options.directory is None else options.directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "xds").mkdir(exist_ok=True)
        self.layout = render.Layout(host, port, 0, directory.resolve(), config.server.tls,
                                    config.server.max_message_bytes)  # fmt: skip
        self._lock = threading.RLock()
        self._structure = ""
        self._cluster_names: set[str] = set()
        self._xds_version = 0
        self._runtime_keys: set[str] = set()
        self._ejected: frozenset[str] = frozenset()  # upstreams whose variants get no traffic right now
        self._log_base = 0
        self.port = port
        self._stops: list[Callable[[], None]] = []
        self._stopped = threading.Event()
        self._behind = threading.Event()  # route removals not yet written to Envoy's files
        self._applied: dict[str, Route] = {}  # the routes Envoy's files hold
        self._pool = UpstreamPool(config.upstreams, config.server.max_message_bytes)
        self._shadow = ShadowSender(metrics, config.shadow.max_in_flight, config.shadow.workers)
        self._local_address = ""
        self.process: EnvoyProcess | ExternalEnvoy
        if options.external_admin is not None:
            admin_port = options.external_admin.rpartition(":")[2]
            if port == 0 or options.directory is None or not admin_port.isdigit():
                raise InvalidInputError(
                    f"an external Envoy needs a fixed --port (got {port}), a shared --envoy-dir and --envoy-admin "
                    f"HOST:PORT (got {options.external_admin!r})"
                )
            self.layout = replace(self.layout, admin_port=int(admin_port))
            self.process = ExternalEnvoy(options.external_admin, prepare=self._prepare, started=self._started)
        else:
            settings = ProcessSettings(directory / "bootstrap.json", self.layout.admin_address_path,
                                       directory / "envoy.log", workers=options.workers)  # fmt: skip
            self.process = EnvoyProcess(options.binary, settings, prepare=self._prepare, started=self._started)
        self._health = health
        self._reader = AccessLogReader(self.layout.access_log_path, metrics, self._reopen_logs, self._observe)

    # ---- start / stop ----------------------------------------------------------------------
    def start(self) -> int:
        self._stops += [self._pool.close, self._shadow.close]
        try:
            self.layout.descriptor_path.write_bytes(descriptor_set())
            comparator = Comparator(self._table, self._pool, self._shadow, self._metrics,
                                    self._config.shadow.max_in_flight)  # fmt: skip
            stop_local, self._local_address = start_local_server(
                comparator, self._python, self._config.server.threads, self._local_handlers, self._health_servicer
            )
            self._stops.append(stop_local)
            routes = self._routes()
            self._refuse_if_invalid(routes, changed=sorted(routes))
            _say_how_streams_run(routes, sorted(routes))
            self.process.start()
            self._stops.append(self.process.stop)
            self._reader.start()
            self._stops.append(self._reader.close)
            ejections = threading.Thread(target=self._watch_ejections, name="kiln-envoy-ejections", daemon=True)
            ejections.start()
            threading.Thread(target=self._catch_up_structure, name="kiln-envoy-xds", daemon=True).start()
            self._stops.append(self._stopped.set)
            self._metrics.catch_up = self.catch_up
            self._table.add_check(self.check)
            self._table.add_listener(self.apply)
        except BaseException:
            self.stop()
            raise
        return self.port

    def stop(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception:
                logger.exception("error while stopping the Envoy data plane")
        if self._own_directory:
            shutil.rmtree(self.layout.directory, ignore_errors=True)

    def _routes(self) -> dict[str, Route]:
        return {name: live.route for name, live in self._table.snapshot.routes.items()}

    def _prepare(self) -> None:
        """Before each (re)start: the bootstrap and xDS files for the current routes."""
        with self._lock:
            routes = self._routes()
            self._write_xds(render.render_clusters(self._config, routes, self.layout.max_message_bytes,
                                                   self._local_address), "cds")  # fmt: skip
            self._write_xds([render.render_route_config(self._config, routes)], "rds")
            self._structure = structure(routes)
            self._applied = dict(routes)
            layout = self.layout if self.port == 0 else replace(self.layout, port=self.port)
            write_atomic(self.process_bootstrap_path, json.dumps(render.render_bootstrap(layout)).encode())
            self._reader.read()
            self._log_base = self._reader.lines

    @property
    def process_bootstrap_path(self) -> Path:
        return self.layout.directory / "bootstrap.json"

    def _started(self, admin: EnvoyAdmin) -> None:
        """After each (re)start: the bound port, and the runtime weights (re-applied after a crash)."""
        if self.port == 0:
            self.port = _listener_port(admin)
        admin.set_runtime(self._runtime(self._routes()))

    # ---- route changes ---------------------------------------------------------------------
    def check(self, routes: Mapping[str, Route]) -> None:
        """Table hook before a change is swapped in: refuse a structural change Envoy would refuse."""
        if structure(routes) == self._structure:
            return
        current = self._routes()
        changed = sorted(p for p, r in routes.items() if p not in current or current[p] != r)
        if not only_removes(current, routes):
            self._refuse_if_invalid(routes, changed)
        _say_how_streams_run(routes, changed)

    def apply(self, snapshot: RoutesSnapshot, change: RouteChange) -> None:
        """Table listener after a change: runtime weights, then (if needed) new xDS files."""
        with self._lock:
            admin = self.process.admin
            if admin is None:
                return
            routes = self._routes()  # the latest, whichever writer's listener runs last
            try:
                admin.set_runtime(self._runtime(routes))
                if structure(routes) == self._structure:
                    return
                if only_removes(self._applied, routes):
                    self._behind.set()  # traffic already left (weight 0): rewrite the files off this thread
                else:
                    self._push_structure(routes)
            except UnavailableError as err:  # Envoy is restarting: _prepare writes the current routes
                logger.warning("could not push routes v%d to Envoy (%s); they apply when it is back",
                               snapshot.version, err)  # fmt: skip

    def _runtime(self, routes: Mapping[str, Route]) -> dict[str, int]:
        """Every runtime key: current weights and shadow fractions, and 0 for keys no longer in use
        (a removed candidate gets no traffic from the next request on, before its route is rewritten)."""
        values = {
            **render.runtime_weights(routes, self._ejected),
            **render.shadow_runtime(routes),
        }
        stale = dict.fromkeys(self._runtime_keys - set(values), 0)
        self._runtime_keys = set(values)
        return {**stale, **values}

    def _push_structure(self, routes: Mapping[str, Route]) -> None:
        clusters = render.render_clusters(self._config, routes, self.layout.max_message_bytes, self._local_address)
        names = {c["name"] for c in clusters}
        previous = json.loads(self.layout.cds_path.read_text(encoding="utf-8"))["resources"]
        kept = [{k: v for k, v in c.items() if k != "@type"} for c in previous if c["name"] not in names]
        self._wait(_CDS_VERSION, self._write_xds(clusters + kept, "cds"))  # new clusters before routes use them
        self._wait(_RDS_VERSION, self._write_xds([render.render_route_config(self._config, routes)], "rds"))
        if kept:  # unused clusters after no route uses them
            self._wait(_CDS_VERSION, self._write_xds(clusters, "cds"))
        self._warm(routes, names - {c["name"] for c in previous})
        self._structure = structure(routes)
        self._applied = dict(routes)

    def _warm(self, routes: Mapping[str, Route], new_clusters: set[str]) -> None:
        """Open the connections of new variant clusters with one pinned ModelReady each, so a canary's
        first requests do not pay the connection set-up (its p99 would otherwise show it)."""
        if self.layout.tls is not None or not new_clusters:
            return
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            ready = channel.unary_unary(f"/{render.SERVICE}/ModelReady")
            for public, route in routes.items():
                for variant in route.variants:
                    if render.cluster_name(public, variant.name) not in new_clusters:
                        continue
                    request = encode_string_field(1, public)
                    try:
                        ready(request, metadata=((PIN_HEADER, variant.name),), timeout=2.0)
                    except grpc.RpcError as err:
                        logger.info("warming %s/%s: %s", public, variant.name, err.code())

    def _catch_up_structure(self) -> None:
        """Background: push removals (rollbacks, promotions) that ``apply`` left for later."""
        while not self._stopped.is_set():
            if not self._behind.wait(0.2):
                continue
            self._behind.clear()
            with self._lock:
                routes = self._routes()
                if self.process.admin is None or structure(routes) == self._structure:
                    continue
                try:
                    self._push_structure(routes)
                except UnavailableError as err:
                    logger.warning("could not push route removals to Envoy (%s); retrying", err)
                    self._behind.set()

    def _write_xds(self, resources: list[dict[str, Any]], kind: str) -> str:
        self._xds_version += 1
        version = str(self._xds_version)
        if kind == "cds":
            self._cluster_names = {r["name"] for r in resources}
            document = render.discovery_response("cluster.v3.Cluster", version, resources)
            path = self.layout.cds_path
        else:
            document = render.discovery_response("route.v3.RouteConfiguration", version, resources)
            path = self.layout.rds_path
        write_atomic(path, json.dumps(document).encode())  # a rename: Envoy sees the old or the new file
        return version

    def _wait(self, stat: str, version: str) -> None:
        admin = self.process.admin
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while admin is not None and time.monotonic() < deadline:
            if admin.stats("^" + stat.replace(".", r"\.") + "$").get(stat) == version:
                return
            time.sleep(0.005)
        raise UnavailableError(
            f"Envoy did not load config version {version} ({stat}) within {ACK_TIMEOUT_S:.0f} s: "
            f"{self.process.log_tail()}"
        )

    def _refuse_if_invalid(self, routes: Mapping[str, Route], changed: list[str]) -> None:
        reason = self._validate(routes)
        if reason is None:
            return
        current = self._routes()
        culprits = [p for p in changed if self._validate({**current, p: routes[p]}) is not None] if changed else []
        names = culprits or changed
        raise InvalidInputError(f"Envoy refused the config for route(s) {names} (nothing was changed): {reason}")

    def _validate(self, routes: Mapping[str, Route]) -> str | None:
        clusters = render.render_clusters(self._config, routes, self.layout.max_message_bytes,
                                          self._local_address or "127.0.0.1:1")  # fmt: skip
        bootstrap = render.render_bootstrap(self.layout, clusters, render.render_route_config(self._config, routes))
        return validate_config(self._options.binary, bootstrap, self.layout.directory)

    # ---- metrics ----------------------------------------------------------------------------
    def catch_up(self, timeout_s: float = 1.0) -> None:
        """Record every request Envoy has completed so far (waits for its next log flush)."""
        admin = self.process.admin
        if admin is None:
            return
        try:
            done = int(admin.stats("^" + _COMPLETED.replace(".", r"\.") + "$").get(_COMPLETED, "0"))
        except (UnavailableError, ValueError):
            self._reader.read()
            return
        target = self._log_base + done
        deadline = time.monotonic() + timeout_s
        while self._reader.read() or self._reader.lines < target:
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)

    def _observe(self, record: Record) -> None:
        """Mirror Envoy's outcomes into the upstream health the admin API reports (/stats)."""
        if self._health is None:
            return
        live = self._table.snapshot.routes.get(record[0])
        if live is None:
            return
        try:
            upstream = live.route.variant(record[1]).upstream
        except KilnError:
            return
        if record[2] == "OK":
            self._health.record_success(upstream)
        elif record[2] == "UNAVAILABLE" and self._health.record_failure(upstream, "UNAVAILABLE through Envoy"):
            self._reweigh()

    def _reweigh(self) -> None:
        """Ejections changed: move ejected variants' shares to their baselines (runtime, next request)."""
        if self._health is None:
            return
        ejected = self._health.ejected_set()
        for upstream in sorted(self._ejected - ejected):  # ejection over: probe before traffic returns
            if not self._probe(upstream):
                self._health.record_failure(upstream, "still unavailable (ServerReady probe)")
        ejected = self._health.ejected_set()
        if ejected == self._ejected:
            return
        with self._lock:
            self._ejected = ejected
            admin = self.process.admin
            if admin is not None:
                try:
                    admin.set_runtime(self._runtime(self._routes()))
                except UnavailableError as err:
                    logger.warning("could not move traffic off ejected upstreams %s: %s", sorted(ejected), err)

    def _probe(self, upstream: str) -> bool:
        try:
            self._pool[upstream].unary("ServerReady")(b"", timeout=0.5)
        except grpc.RpcError:
            return False
        return True

    def _watch_ejections(self) -> None:
        while not self._stopped.wait(0.1):
            self._reweigh()

    def _reopen_logs(self) -> None:
        if self.process.admin is not None:
            self.process.admin.post("/reopen_logs")


def _say_how_streams_run(routes: Mapping[str, Route], names: list[str]) -> None:
    for public in names:
        if render.streams_via_kiln(public, routes[public]):
            logger.info(
                "route %r: ModelStreamInfer runs on Kiln's Python stream proxy beside Envoy (a variant's model "
                "name or version differs from the public name, and Envoy cannot rewrite stream messages); "
                "unary calls run on Envoy", public,
            )  # fmt: skip


def _listener_port(admin: EnvoyAdmin) -> int:
    listeners = json.loads(admin.get("/listeners?format=json"))
    for status in listeners.get("listener_statuses", []):
        if status.get("name") == render.LISTENER:
            return int(status["local_address"]["socket_address"]["port_value"])
    raise UnavailableError(f"Envoy reports no '{render.LISTENER}' listener: {listeners}")
