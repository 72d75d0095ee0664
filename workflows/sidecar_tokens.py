"""Session-scoped audio tokens for the sidecars' audio WebSocket, minted by the API.

Pure stdlib, so the API (which may import only workflows) mints exactly what the sidecar
(`realtime.sidecar.auth`, which verifies them) expects: `<expires_at_s>.<hex HMAC-SHA256>` over
the session id and expiry, under a key derived from the shared sidecar secret for this one
purpose. tests/e2e/security checks that a token minted here opens the sidecar's socket.
"""

from __future__ import annotations

import hashlib
import hmac

_AUDIO_KEY_LABEL = b"lipsync-live sidecar audio token key v1"
_AUDIO_MAC_LABEL = "lipsync-audio-v1"
AUDIO_TOKEN_PARAM = "token"


def mint_audio_token(secret: str, session_id: str, expires_at_s: int) -> str:
    key = hmac.new(secret.encode(), _AUDIO_KEY_LABEL, hashlib.sha256).digest()
    message = f"{_AUDIO_MAC_LABEL}\n{session_id}\n{expires_at_s}".encode()
    return f"{expires_at_s}.{hmac.new(key, message, hashlib.sha256).hexdigest()}"


def audio_token_valid(secret: str, token: str, session_id: str, now_s: float) -> bool:
    """Whether `token` opens `session_id`'s audio at `now_s` (the API's own relay accepts it too)."""
    expires_text, dot, _mac = token.partition(".")
    if not dot or not expires_text.isdigit():
        return False
    expected = mint_audio_token(secret, session_id, int(expires_text))
    return hmac.compare_digest(token.encode(), expected.encode()) and int(expires_text) > now_s
