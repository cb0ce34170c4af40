"""Training, evaluation and sampling of NVAE models (what ``nvae-fast train/evaluate/sample`` run).

Modules: ``datasets`` (formats) and ``loaders`` (sampling, num_x_bits), ``schedules`` and
``losses`` (the official recipe), ``recipe`` (``TrainConfig`` and training presets), ``trainer``
(one step: AMP, EMA, NaN/Inf guard), ``loop`` (the run: epochs, evaluation, checkpoints, logs),
``evaluate``, ``sample``, ``checkpoint`` (atomic IO, RNG states), ``weights`` (load and export),
``runtime`` (device, torchrun, DDP), ``monitor`` (tqdm, TensorBoard, console), ``options`` (CLI flags).
"""

from nvae_fast.train.errors import InputError, MissingPathError, TrainingDiverged
from nvae_fast.train.evaluate import EvalResult, evaluate
from nvae_fast.train.loop import TrainResult, run_training
from nvae_fast.train.recipe import TRAIN_PRESETS, TrainConfig
from nvae_fast.train.runtime import Runtime, init_runtime
from nvae_fast.train.sample import generate, write_samples
from nvae_fast.train.trainer import Trainer
from nvae_fast.train.weights import load_trained_model

__all__ = ["EvalResult", "InputError", "MissingPathError", "Runtime", "TRAIN_PRESETS", "TrainConfig", "TrainResult",
           "Trainer", "TrainingDiverged", "evaluate", "generate", "init_runtime", "load_trained_model",
           "run_training", "write_samples"]
