"""The two Lua programs Envoy runs for Kiln, with their per-variant constants filled in as literals.

``ROUTE_SCRIPT`` (listener filter, every request): copy the ``model_name`` that the gRPC field
extraction filter read out of the body into the ``x-kiln-model`` header and clear the route cache,
so routes can match on it. ``rewrite_script(...)`` (upstream filter of one variant's cluster, unary
calls only): append the variant's model name/version to the request (protobuf keeps the last value
of a field) and the public name to the response, fixing the 5-byte gRPC frame length. Lua cannot
rewrite a bidirectional stream's messages, so streams pass through unchanged (see ``render``).
"""

from __future__ import annotations

from server.gateway.wire import encode_string_field, encode_varint, name_version_suffix

MODEL_HEADER = "x-kiln-model"
VERSION_HEADER = "x-kiln-version"  # set only when the request names a model_version
EXTRACTION_NAMESPACE = "envoy.filters.http.grpc_field_extraction"

ROUTE_SCRIPT = """
function envoy_on_request(h)
  local headers = h:headers()
  headers:remove("x-kiln-model")
  headers:remove("x-kiln-version")
  local md = h:streamInfo():dynamicMetadata():get("envoy.filters.http.grpc_field_extraction")
  if md == nil then return end
  local v = md["model_name"] or md["name"]
  if type(v) == "table" then v = v[1] end
  local version = md["model_version"]
  if type(version) == "table" then version = version[1] end
  -- only its presence routes (to Kiln, which reads the version from the body itself)
  if version ~= nil and version ~= "" then headers:replace("x-kiln-version", "1") end
  if v ~= nil and v ~= "" then
    -- route names are [A-Za-z0-9_.-]; anything else cannot be routed (and may not be a valid header)
    if v:find("[^%w_.%-]") or #v > 200 then v = "(not a route name)" end
    headers:replace("x-kiln-model", v)
    h:clearRouteCache()
  end
end
"""

_REWRITE_BODY = """
local function reframe(body, extra)
  local n = body:length()
  if n < 5 then return end
  local f, b1, b2, b3, b4 = body:getBytes(0, 5):byte(1, 5)
  if f ~= 0 or ((b1 * 256 + b2) * 256 + b3) * 256 + b4 ~= n - 5 then return end
  local m = n - 5 + #extra
  body:setBytes(string.char(0, math.floor(m / 16777216) % 256, math.floor(m / 65536) % 256,
    math.floor(m / 256) % 256, m % 256) .. body:getBytes(5, n - 5) .. extra)
end
local RESPONSE = {
  ["/inference.GRPCInferenceService/ModelInfer"] = NAME_FIELD,
  ["/inference.GRPCInferenceService/ModelMetadata"] = NAME_FIELD,
  ["/inference.GRPCInferenceService/ModelConfig"] = CONFIG_FIELD,
}
function envoy_on_request(h)
  local path = h:headers():get(":path")
  if path == "/inference.GRPCInferenceService/ModelStreamInfer" then return end
  local body = h:body()
  if body ~= nil then reframe(body, REQUEST_SUFFIX) end
  if RESPONSE[path] ~= nil then h:streamInfo():dynamicMetadata():set("kiln", "path", path) end
end
function envoy_on_response(h)
  local md = h:streamInfo():dynamicMetadata():get("kiln")
  if md == nil or md["path"] == nil then return end
  if h:headers():get("grpc-status") ~= nil then return end
  local body = h:body()
  if body ~= nil then reframe(body, RESPONSE[md["path"]]) end
end
"""


def lua_string(data: bytes) -> str:
    """``data`` as a Lua string literal (decimal escapes: exact for any byte, no quoting traps)."""
    return '"' + "".join(f"\\{byte}" for byte in data) + '"'


def rewrite_script(model: str, version: str, public: str) -> str:
    """The upstream Lua filter of one variant: request -> (model, version), responses -> ``public``."""
    name_field = encode_string_field(1, public)
    config_field = encode_varint((1 << 3) | 2) + encode_varint(len(name_field)) + name_field
    constants = (
        f"local REQUEST_SUFFIX = {lua_string(name_version_suffix(model, version))}\n"
        f"local NAME_FIELD = {lua_string(name_field)}\n"
        f"local CONFIG_FIELD = {lua_string(config_field)}\n"
    )
    return constants + _REWRITE_BODY
