"""What keeps `medseg serve` closed to whoever merely reaches it: the rules on where it may listen and with what
token, the parsing of `Authorization: Bearer`, the names a browser may reach it by (DNS rebinding), and the
headers every answer carries.
"""
from __future__ import annotations

import contextlib
import hashlib
import secrets

from medseg.errors import MedsegError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 22  # 128 bits as base64url (secrets.token_urlsafe(16)); 32 as hex
# Every answer: nothing cached (results are a patient's), nothing sniffed, framed or referred; scripts and styles
# from this server only, never inline ('wasm-unsafe-eval' lets NiiVue's WebAssembly decoders compile, not eval)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self' blob: data:; worker-src 'self' blob:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
}


def check_exposure(host: str, token: str | None) -> None:
    """Refuse, in one line, a server that anyone on the network could use: an empty token, or an address beyond
    this machine without a token of at least 128 bits."""
    if token is not None and not token.strip():
        raise MedsegError("the token is empty (MEDSEG_TOKEN or --token set to nothing); set a random one, e.g. "
                          "MEDSEG_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(16))'), or unset it")
    if host not in LOOPBACK and (token is None or len(token) < MIN_TOKEN_CHARS):
        raise MedsegError(f"--host {host}: listening beyond this machine needs a token of at least 128 bits "
                          f"({MIN_TOKEN_CHARS}+ random characters): MEDSEG_TOKEN=$(python -c 'import secrets; "
                          "print(secrets.token_urlsafe(16))'); refused")


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (RFC 6750: the scheme in any case, then spaces and
    one token); None for anything else, a bare token included."""
    scheme, _, rest = (authorization or "").partition(" ")
    token = rest.strip(" ")
    return token if scheme.lower() == "bearer" and token and " " not in token else None


def host_names(host: str, extra: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The names a browser may use for this server (the Host header is checked against them, so that a page of
    another site rebound to this address by DNS is turned away): loopback, the bound address and, bound to every
    interface, this machine's names and addresses; plus `extra` (--allowed-host, e.g. a reverse proxy's name)."""
    import socket

    names = {*LOOPBACK, host, *extra}
    if host in ("0.0.0.0", "::"):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        with contextlib.suppress(OSError):
            names |= set(socket.gethostbyname_ex(hostname)[2])
    return {n.lower() for n in names}


def host_of(header: str) -> str:
    """The name in a Host header, its port taken off ('[::1]:8000' -> '::1')."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


def authorised(authorization: str | None, token: str | None) -> bool:
    """Whether a request's Authorization header carries the server's token (always, where none is set); compared
    in constant time. The one check behind both the gate (before an upload's body) and every route."""
    if token is None:
        return True
    return secrets.compare_digest((bearer(authorization) or "").encode(), token.encode())


def token_id(authorization: str | None) -> str | None:
    """A short hash naming the token a request presented, for the audit log (never the token itself)."""
    given = bearer(authorization)
    return hashlib.sha256(given.encode()).hexdigest()[:12] if given else None
