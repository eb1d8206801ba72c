"""A shorter run for the hottest API operations (the send, the mark-read), same answers.

django-ninja runs every operation through the same generic steps: a pydantic model per
parameter source built and validated (``PathParams``, ``BodyParams`` wrapping the body
model), a fresh response object for headers the view might set, each step looked up for
every request. For an operation of the plain shape, path parameters and one JSON body model,
that is about 8 % of a send's CPU in the process (README 3h).

:func:`direct` is applied with ninja's own ``decorate_view``, so it wraps ninja's
``Operation.run`` of that operation and nothing else: the URL, the method dispatch, the
OpenAPI schema and the view function stay ninja's. Its run takes the same steps with the
same objects, the generic machinery left out:

1. each path parameter validated by its own annotation (the same pydantic constraints, read
   off ninja's signature), the body parsed by the API's parser and validated by the body's
   own model, with ninja's validation context;
2. the operation's authentication callback (the API's bearer token);
3. the view function;
4. ninja's own conversion of the result to a response (the response schema for the status,
   ``exclude_none`` and the renderer), and its exception handlers for what the view raised.

Anything it does not take on goes to ninja's run, untouched, which then answers as it always
did: a missing or refused token (401), a path or body that fails validation (400, 413 or
422), an empty body, an operation with throttles, more auth callbacks or other parameter
sources. So the order of the first two steps changes no answer: a refused request is answered
by ninja, which checks the token first. Only a refused token is checked twice."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from django.http import HttpRequest, HttpResponseBase
from ninja.params.models import Body, Path
from pydantic import BaseModel, TypeAdapter


@dataclass(frozen=True)
class _Plan:
    auth: Callable[[HttpRequest], Any]
    path: dict[str, TypeAdapter]
    body_name: str
    body_model: type[BaseModel]


@cache
def _plan(operation) -> _Plan | None:
    """How to run ``operation`` directly, or None where it is not of the plain shape (worked
    out on its first call: ninja sets the auth of an operation when it mounts it)."""
    params = operation.signature.params
    bodies = [p for p in params if isinstance(p.source, Body)]
    paths = [p for p in params if isinstance(p.source, Path)]
    if (
        len(operation.auth_callbacks) != 1
        or getattr(operation, "throttle_objects", None)
        or len(bodies) != 1
        or len(bodies) + len(paths) != len(params)
        or not (
            isinstance(bodies[0].annotation, type) and issubclass(bodies[0].annotation, BaseModel)
        )
        or any(p.name != p.alias for p in params)
    ):
        return None
    return _Plan(
        auth=operation.auth_callbacks[0],
        path={p.name: TypeAdapter(Annotated[p.annotation, p.source]) for p in paths},
        body_name=bodies[0].name,
        body_model=bodies[0].annotation,
    )


def _values(plan: _Plan, api, request: HttpRequest, path: dict) -> dict | None:
    """The view's arguments, validated; None for an empty body (ninja's run refuses it)."""
    if not request.body:  # (a body over the limit raises RequestDataTooBig here)
        return None
    values = {name: adapter.validate_python(path[name]) for name, adapter in plan.path.items()}
    data = api.parser.parse_body(request)
    values[plan.body_name] = plan.body_model.model_validate(data, context={"request": request})
    return values


def direct(run: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """A run decorator (``@decorate_view(direct)`` under the route's decorator): the
    operation's ``run``, shortened as the module says."""
    operation = run.__self__

    def direct_run(request: HttpRequest, **kw: Any) -> HttpResponseBase:
        plan, auth, api = _plan(operation), None, operation.api
        if plan is not None:
            try:
                values = _values(plan, api, request, kw)
                auth = values is not None and plan.auth(request)
            except Exception:  # ninja's run answers it as it always did
                auth = None
        if not auth:
            return run(request, **kw)
        request.auth = auth
        try:
            temporal_response = api.create_temporal_response(request)
            result = operation.view_func(request, **values)
            return operation._result_to_response(request, result, temporal_response)
        except Exception as exc:  # as in ninja's run: the API's handlers answer
            return api.on_exception(request, exc)

    return direct_run
