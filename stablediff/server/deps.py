"""FastAPI dependencies: the server's services and the user asking, checked in this one place for every route."""
from fastapi import HTTPException, Request

from stablediff.server.auth import LOCAL, User, parse_basic, token_digest
from stablediff.server.jobs import Services

CHALLENGE = {"WWW-Authenticate": 'Basic realm="stablediff", charset="UTF-8"'}


async def services(request: Request) -> Services:
    return request.app.state.services


def current_user(request: Request) -> User:
    """The user of a request: HTTP Basic on every route, a bearer token on /v1; 401 otherwise."""
    users = request.app.state.users
    if not users.enabled:
        return User(LOCAL, admin=True)
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer ") and request.url.path.startswith("/v1/"):
        owner = request.app.state.services.store.token_owner(token_digest(header[7:].strip()))
        user = users.user(owner) if owner else None
    else:
        given = parse_basic(header)
        user = users.basic(*given) if given else None
    if user is None:
        # a page's script (fetch) gets no challenge: the browser would open its own sign-in prompt over the page's form
        scripted = request.headers.get("sec-fetch-mode") in ("cors", "same-origin", "no-cors")
        raise HTTPException(401, "sign in: send HTTP Basic credentials (or a bearer token on /v1)",
                            headers=None if scripted else CHALLENGE)
    return user
