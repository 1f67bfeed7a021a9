"""`/l/<code>`: short links in SMS texts, redirecting to the campaign link and counting clicks."""

from __future__ import annotations

from litestar import MediaType, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath
from litestar.response import Redirect

from api.dependencies import TransactionsDep
from shared.calls.links import follow
from shared.core.models import utcnow


@get(
    "/l/{code:str}",
    summary="Follow a short link",
    description="Redirects (302) to the full link and records the click on the call's row.",
    tags=["Links"],
    responses={
        302: ResponseSpec(None, description="Redirect to the full link"),
        400: ResponseSpec(
            str, description="A code with control characters", media_type=MediaType.TEXT
        ),
        404: ResponseSpec(str, description="Unknown or expired link", media_type=MediaType.TEXT),
    },
    include_in_schema=True,
)
async def follow_short_link(
    transactions: TransactionsDep, code: FromPath[str]
) -> Response[str] | Redirect:
    target = await transactions.run_unbounded(lambda session: follow(session, code, utcnow()))
    if target is None:
        return Response("Link not found", status_code=404, media_type=MediaType.TEXT)
    return Redirect(target, status_code=302)
