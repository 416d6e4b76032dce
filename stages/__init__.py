"""The pipeline's stages, the engines that compute them, checkpoints and the model cache."""

from stages.definitions import (BY_NAME, FINAL_STAGE, STAGE_NAMES, STAGES, JobInputs, Stage, StageCall,
                                fingerprint_chain, needed_stages, runnable_stages)
from stages.engine import ENGINES, Engine, SampleResume, StageInterrupted, create_engine, engine_operation
from stages.errors import ModelNotFoundError, PermanentError, QieError, RetryableError, classify
from stages.model_cache import ModelCache

__all__ = ["BY_NAME", "FINAL_STAGE", "STAGE_NAMES", "STAGES", "JobInputs", "Stage", "StageCall",
           "fingerprint_chain", "needed_stages", "runnable_stages", "ENGINES", "Engine", "SampleResume",
           "StageInterrupted", "create_engine", "engine_operation", "ModelNotFoundError", "PermanentError",
           "QieError", "RetryableError", "classify", "ModelCache"]
