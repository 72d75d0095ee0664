"""Who may call a sidecar: the service credential and session-scoped audio tokens.

Two credentials, both derived from one shared secret (`LIPSYNC_SIDECAR_SECRET`, or a file named by
`LIPSYNC_SIDECAR_SECRET_FILE`) that the sidecars and the API hold:

- the service credential, `Authorization: Bearer <secret>`: the API (audio relay, health and stats
  reads) and operators. It opens every route.
- an audio token, `?token=<expires_at_s>.<mac>` on the audio WebSocket: opens the audio WebSocket of
  one session until it expires, and nothing else. The API mints it into the `audio_ws_url` it hands
  out, so a client streams audio without knowing any secret. The MAC is HMAC-SHA256 under a key
  derived from the secret for this one purpose, so a token never reveals the secret nor works as a
  service credential.

`workflows/sidecar_tokens.py` mints the same tokens for the API (which may not import realtime);
tests/e2e/security checks that the two agree.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from enum import StrEnum
from pathlib import Path

from realtime.errors import LipsyncError

SECRET_ENV = "LIPSYNC_SIDECAR_SECRET"
SECRET_FILE_ENV = "LIPSYNC_SIDECAR_SECRET_FILE"
# A secret shorter than this is guessable offline from one observed token.
MIN_SECRET_CHARS = 32
AUDIO_TOKEN_PARAM = "token"
_AUDIO_KEY_LABEL = b"lipsync-live sidecar audio token key v1"
_AUDIO_MAC_LABEL = "lipsync-audio-v1"


class SecretError(LipsyncError, ValueError):
    """No usable sidecar secret was configured; the message says how to set one."""

    code = "sidecar_secret_invalid"


class TokenRefusal(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    WRONG_SESSION_OR_KEY = "bad_signature"  # minted for another session, or under another secret


def check_secret(secret: str, source: str) -> str:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise SecretError(
            f"the sidecar secret from {source} has {len(secret)} characters; at least {MIN_SECRET_CHARS} are "
            "needed (generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret


def load_secret(secret_file: Path | None = None) -> str:
    """The secret from `secret_file`, else $LIPSYNC_SIDECAR_SECRET_FILE, else $LIPSYNC_SIDECAR_SECRET."""
    path = secret_file or (Path(os.environ[SECRET_FILE_ENV]) if os.environ.get(SECRET_FILE_ENV) else None)
    if path is not None:
        try:
            return check_secret(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise SecretError(f"cannot read the sidecar secret file {path}: {exc.strerror}") from exc
    value = os.environ.get(SECRET_ENV, "")
    if not value:
        raise SecretError(
            f"no sidecar secret: set {SECRET_ENV} (or {SECRET_FILE_ENV}, or --secret-file) to the secret "
            "the API shares with its sidecars; every sidecar route but the bare /healthz needs it"
        )
    return check_secret(value, SECRET_ENV)


def _audio_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _AUDIO_KEY_LABEL, hashlib.sha256).digest()


def _audio_mac(secret: str, session_id: str, expires_at_s: int) -> str:
    message = f"{_AUDIO_MAC_LABEL}\n{session_id}\n{expires_at_s}".encode()
    return hmac.new(_audio_key(secret), message, hashlib.sha256).hexdigest()


def mint_audio_token(secret: str, session_id: str, expires_at_s: int) -> str:
    return f"{expires_at_s}.{_audio_mac(secret, session_id, expires_at_s)}"


def check_audio_token(
    secret: str, token: str | None, session_id: str, now_s: float | None = None
) -> TokenRefusal | None:
    """None when `token` opens `session_id`'s audio now; else why not."""
    if not token:
        return TokenRefusal.MISSING
    expires_text, dot, mac = token.partition(".")
    if not dot or not expires_text.isdigit() or len(mac) != 64:
        return TokenRefusal.MALFORMED
    expires_at_s = int(expires_text)
    # The MAC first: an expiry is only news about a token this secret signed.
    if not hmac.compare_digest(mac, _audio_mac(secret, session_id, expires_at_s)):
        return TokenRefusal.WRONG_SESSION_OR_KEY
    if expires_at_s <= (time.time() if now_s is None else now_s):
        return TokenRefusal.EXPIRED
    return None


def bearer_of(authorization: str | None) -> str | None:
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_service_credential(secret: str, authorization: str | None) -> bool:
    presented = bearer_of(authorization)
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())
