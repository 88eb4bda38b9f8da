"""The OpenAPI document (/schema), made to say what the server does.

Litestar derives it from the handlers, and on its own it would be wrong in four ways: its schemas of our Structs drop
a bound of 0 (`seed >= 0`, `noise_scale >= 0`) and `forbid_unknown_fields`; its error responses describe Litestar's
error body, not `error_response`'s; it cannot know the errors the request gate (serve/access.py) answers on every
route; and the upload reads its raw body itself. So once Litestar has built the document, `make_openapi_true`
replaces our Structs' schemas by msgspec's own, gives every error the one error body, adds the gate's errors to every
operation, and describes the upload's body.

Handlers declare the errors they raise themselves with `errors(...)`, next to the code that raises them.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi.datastructures import ResponseSpec
from litestar.routes import HTTPRoute

from serve import schemas
from serve.access import BODY_MEDIA_TYPE_OPT, PUBLIC_OPT

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
FILE_MEDIA_TYPES_OPT = "file_media_types"
"""Route opt of a handler that returns a File: the media types it serves (Litestar documents none)."""
BINARY = {"schema": {"type": "string", "format": "binary"}}
WHY = {
    400: "The request is malformed (its body, query or SDP), or its Host header names another server",
    401: "The server has an API token (--api-token) and the request did not carry it",
    404: "What the request names does not exist",
    409: "The request conflicts with the current state: a pipeline is loading; a recording already runs, none runs, "
    "or it is still being written; no frame was sent yet",
    410: "Cluster front only: the session's worker is gone (it died or left), and its stream ended with it",
    413: "The body is over the limit (JSON: --max-json-body-bytes; uploads: --max-upload-mb)",
    415: "The Content-Type is not the route's (application/json; uploads: application/octet-stream), or the upload "
    "is neither an image nor a video",
    422: "The parameters parse but are not valid for the pipeline",
    501: "The pipeline is declared but not part of this build",
    503: "Every session slot is taken (a cluster front: no live worker has a free seat, or none is free to load)",
    507: "The asset folder has no room for the upload",
}


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """`responses=` for a handler: the error codes it raises besides the ones every route may answer."""
    return {code: ResponseSpec(data_container=schemas.ErrorBody, description=WHY[code]) for code in codes}


def make_openapi_true(app: Litestar) -> None:
    plugin = app.plugins.get(OpenAPIPlugin)
    document = plugin.provide_openapi_schema()
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in _struct_schemas().items():
        components[name] = schema
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                operation = document["paths"].get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    _complete_operation(operation, method, handler.opt)
    plugin._openapi_schema = document  # Litestar serves this cached dict; it has no public hook to amend it


def _struct_schemas() -> dict[str, Any]:
    structs = [
        value
        for value in vars(schemas).values()
        if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__module__ == schemas.__name__
    ]
    _, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    return components


def _complete_operation(operation: dict[str, Any], method: str, opt: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    gate_codes = [400]
    if not opt.get(PUBLIC_OPT):
        gate_codes.append(401)
    if method in ("POST", "PATCH"):
        gate_codes.append(415)
    if "requestBody" in operation:
        gate_codes.append(413)
    for code in gate_codes:
        responses.setdefault(str(code), {"description": WHY[code]})
    for code, response in responses.items():
        if int(code) >= 400:
            response["content"] = {"application/json": {"schema": ERROR_REF}}
            response.setdefault("description", HTTPStatus(int(code)).phrase)
    if opt.get(BODY_MEDIA_TYPE_OPT) == "application/octet-stream":
        operation["requestBody"] = {
            "required": True,
            "description": "The file's bytes; its content decides the type, not its name",
            "content": {"application/octet-stream": BINARY},
        }
    if file_types := opt.get(FILE_MEDIA_TYPES_OPT):
        responses["200"]["content"] = dict.fromkeys(file_types, BINARY)
