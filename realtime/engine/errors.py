"""Engine errors: one class per failure the engine can explain, each with its stable `code`.

Callers (activities, the sidecar, the CLI) tell them apart by class or code, never by text.
"""

from __future__ import annotations

from realtime.errors import LipsyncError


class EngineError(LipsyncError):
    code = "engine_error"


# --- model files -----------------------------------------------------------------------------


class ModelError(EngineError):
    code = "model_error"


class ModelFilesMissing(ModelError):
    code = "model_files_missing"


class ModelFileCorrupt(ModelError):
    code = "model_file_corrupt"


class ModelConfigInvalid(ModelError):
    code = "model_config_invalid"


class ModelWeightsMismatch(ModelError):
    """The weights do not fit the architecture their config declares (strict load failed)."""

    code = "model_weights_mismatch"


# --- avatar sources --------------------------------------------------------------------------


class AvatarError(EngineError):
    code = "avatar_error"


class AvatarUnsupported(AvatarError):
    code = "avatar_unsupported"


class AvatarNoImages(AvatarError):
    code = "avatar_no_images"


class AvatarTooLarge(AvatarError):
    code = "avatar_too_large"


class AvatarUnreadableImage(AvatarError):
    code = "avatar_unreadable_image"


class AvatarMixedSizes(AvatarError):
    code = "avatar_mixed_sizes"


class AvatarNoFace(AvatarError):
    code = "avatar_no_face"


class AvatarNoVideoStream(AvatarError):
    code = "avatar_no_video_stream"


class AvatarUnreadableVideo(AvatarError):
    code = "avatar_unreadable_video"


class AvatarManifestInvalid(AvatarError):
    code = "avatar_manifest_invalid"


# --- audio and rendering ---------------------------------------------------------------------


class AudioInvalid(EngineError):
    code = "audio_invalid"


class RenderRequestInvalid(EngineError):
    code = "render_request_invalid"
