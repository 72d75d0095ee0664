"""lipsync-live avatars for LiveKit Agents: `AvatarSession(avatar=...).start(agent_session,
room=ctx.room)`."""

from livekit.plugins.lipsync.avatar import AvatarSession, LipsyncAvatarError
from livekit.plugins.lipsync.version import __version__

__all__ = ["AvatarSession", "LipsyncAvatarError", "__version__"]
