"""lipsync-live for Pipecat: `LipsyncVideoService`, a lip-synced LiveKit avatar fed by the pipeline's TTS
audio."""

from pipecat_lipsync.video import LipsyncVideoService

__all__ = ["LipsyncVideoService"]
