"""Experiment loggers (TensorBoard, MLflow, Weights & Biases): each one that is installed follows a training run through
the Trainer's callbacks; see registry for the switch (MOBILE_YOLO_LOGGERS_OFF) and the failure rules."""

from utils.loggers.registry import LOGGERS, OFF_ENV, ActiveLoggers, LoggerError, LoggerSpec, attach_loggers

__all__ = ["LOGGERS", "OFF_ENV", "ActiveLoggers", "LoggerError", "LoggerSpec", "attach_loggers"]
