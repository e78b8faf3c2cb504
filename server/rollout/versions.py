"""Rollouts by version: make sure upstreams serve a candidate version before traffic moves, and
retire the previous version after promotion.

``GrpcVersionControl`` talks to each upstream (a Kiln server or a real Triton) over the KServe v2
repository API. ``ensure_serving`` returns at once when ``ModelReady(model, version)`` is true;
otherwise it loads the model with Triton's ``config`` override whose version policy is the versions
serving now plus the candidate (so a reload never drops the baseline, whatever ``config.pbtxt``
says) and waits for ``ModelReady`` on that exact version. A server that refuses the repository API
(not in explicit mode) may still pick the version up by polling, so it is waited for too. Never
ready: ``UnavailableError`` (``NotFoundError`` when the server says the version does not exist),
naming the upstream. ``retire`` reloads with the served versions minus the retired one.

The pure helpers decide which upstreams a version rollout touches and which routes still point at
a version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf import json_format

from core.errors import ConflictError, NotFoundError, UnavailableError
from server.gateway.config import Upstream
from server.rollout.plan import CandidateSpec

POLL_S = 0.1
_REFUSED = ("not allowed", "--model-control-mode", "model control")  # Triton's and Kiln's refusal words


def upstreams_for(route: Mapping[str, Any], candidate: CandidateSpec) -> list[str]:
    """The candidate's upstream, then every other upstream of the route serving the same model."""
    names = [candidate.upstream]
    for variant in route.get("variants", []):
        if variant.get("model") == candidate.model and variant.get("upstream") not in names:
            names.append(str(variant["upstream"]))
    return names


def routes_pointing_at(
    routes: Mapping[str, Mapping[str, Any]], upstreams: Iterable[str], model: str, version: str
) -> list[str]:
    """``route/variant`` of every variant (any weight) naming ``model`` ``version`` on one of ``upstreams``."""
    wanted = set(upstreams)
    return [
        f"{public}/{variant.get('name')}"
        for public, route in sorted(routes.items())
        for variant in route.get("variants", [])
        if variant.get("model") == model
        and str(variant.get("version") or "") == version
        and variant.get("upstream") in wanted
    ]


def _client(upstream: Upstream) -> Any:
    import tritonclient.grpc as tc

    tls = upstream.tls
    if tls is None:
        return tc.InferenceServerClient(upstream.address)
    args = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else None
    return tc.InferenceServerClient(
        upstream.address,
        ssl=True,
        root_certificates=str(tls.ca) if tls.ca else None,
        private_key=str(tls.key) if tls.key else None,
        certificate_chain=str(tls.cert) if tls.cert else None,
        channel_args=args,
    )


def _message(err: Exception) -> str:
    text = getattr(err, "message", None)
    return str(text() if callable(text) else err)


def _status(err: Exception) -> str:
    status = getattr(err, "status", None)
    return str(status() if callable(status) else "")


class GrpcVersionControl:
    """Version loading and retiring on the upstreams a gateway knows (name -> address, TLS)."""

    def __init__(
        self,
        upstreams: Callable[[], Mapping[str, Upstream]],
        *,
        timeout_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._upstreams = upstreams
        self._rpc_timeout_s = timeout_s
        self._sleep = sleep

    def _upstream(self, name: str) -> Upstream:
        upstreams = self._upstreams()
        if name not in upstreams:
            raise NotFoundError(f"upstream {name!r} is not configured; upstreams are {sorted(upstreams)}")
        return upstreams[name]

    def ensure_serving(self, upstream: str, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        """Wait until ``upstream`` serves ``model`` ``version``, loading it where allowed; returns figures."""
        from tritonclient.utils import InferenceServerException

        target = self._upstream(upstream)
        where = f"upstream {upstream!r} ({target.address})"
        start = time.perf_counter_ns()
        client = _client(target)
        refused = ""
        try:
            if self._ready(client, model, version):
                return {"upstream": upstream, "loaded": False, "waited_s": 0.0}
            try:
                self._load_with(client, model, version)
            except InferenceServerException as err:
                text = _message(err)
                if not any(word in text for word in _REFUSED):
                    cls = NotFoundError if "NOT_FOUND" in _status(err) else UnavailableError
                    raise cls(
                        f"{where} could not load {model} version {version}: {text}; publish that version "
                        "into its repository (or fix it) and start the rollout again"
                    ) from err
                refused = f"; it refuses to load models through the repository API ({text})"
            deadline = start + int(timeout_s * 1e9)
            while time.perf_counter_ns() < deadline:
                if self._ready(client, model, version):
                    waited = (time.perf_counter_ns() - start) / 1e9
                    return {"upstream": upstream, "loaded": not refused, "waited_s": round(waited, 3)}
                self._sleep(POLL_S)
        finally:
            client.close()
        raise UnavailableError(
            f"{where} does not serve {model} version {version}: not ready after {timeout_s:g} s{refused}. "
            "Publish the version and load it there (explicit mode) or let a poll-mode server pick it up, then "
            "start the rollout again"
        )

    def retire(self, upstream: str, model: str, version: str) -> dict[str, Any]:
        """Stop ``upstream`` serving ``model`` ``version``, keeping its other versions; returns what remains."""
        from tritonclient.utils import InferenceServerException

        target = self._upstream(upstream)
        where = f"upstream {upstream!r} ({target.address})"
        client = _client(target)
        try:
            served = self._served(client, model)
            if version not in served:
                return {"upstream": upstream, "retired": False, "served": served}
            remaining = [v for v in served if v != version]
            if not remaining:
                raise ConflictError(
                    f"{where} serves only version {version} of {model}; retiring it would unload the model"
                )
            try:
                self._load_policy(client, model, remaining)
            except InferenceServerException as err:
                raise ConflictError(
                    f"{where} did not retire {model} version {version}: {_message(err)}. Where the server is not in "
                    f"explicit mode, change the repository instead: kiln repo policy {model} --keep-versions "
                    f"specific:{','.join(remaining)}"
                ) from err
            return {"upstream": upstream, "retired": True, "served": remaining}
        finally:
            client.close()

    # -- one upstream --------------------------------------------------------------------------
    def _ready(self, client: Any, model: str, version: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(client.is_model_ready(model, version, client_timeout=self._rpc_timeout_s))
        except InferenceServerException:
            return False

    def _served(self, client: Any, model: str) -> list[str]:
        from tritonclient.utils import InferenceServerException

        try:
            metadata = client.get_model_metadata(model, client_timeout=self._rpc_timeout_s)
        except InferenceServerException:
            return []  # not loaded
        return sorted((str(v) for v in metadata.versions), key=int)

    def _load_with(self, client: Any, model: str, version: str) -> None:
        """Load ``model`` so that it serves ``version`` beside the versions serving now."""
        served = self._served(client, model)
        if not served:
            client.load_model(model, client_timeout=self._rpc_timeout_s)  # as config.pbtxt says
            if self._ready(client, model, version):
                return
            served = self._served(client, model)
        self._load_policy(client, model, sorted({*served, version}, key=int))

    def _load_policy(self, client: Any, model: str, versions: list[str]) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            config = client.get_model_config(model, client_timeout=self._rpc_timeout_s).config
        except InferenceServerException as err:
            raise UnavailableError(f"cannot read the config of {model}: {_message(err)}") from err
        config.ClearField("version_policy")
        config.version_policy.specific.versions.extend(int(v) for v in versions)
        text = json_format.MessageToJson(config, preserving_proto_field_name=True)
        client.load_model(model, config=text, client_timeout=self._rpc_timeout_s)
