"""The pipeline's stages, the engines that compute them, checkpoints and the model cache."""

from stages.definitions import (BY_NAME, STAGE_NAMES, STAGES, JobInputs, Stage, StageContext, compute,
                                fingerprint_chain)
from stages.engine import Engine, SampleResume, StageInterrupted, create_engine
from stages.errors import ModelNotFoundError, PermanentError, QieError, RetryableError, classify
from stages.model_cache import ModelCache

__all__ = ["BY_NAME", "STAGE_NAMES", "STAGES", "JobInputs", "Stage", "StageContext", "compute",
           "fingerprint_chain", "Engine", "SampleResume", "StageInterrupted", "create_engine",
           "ModelNotFoundError", "PermanentError", "QieError", "RetryableError", "classify", "ModelCache"]
