"""Tasks (detect, segment, classify): each owns its data, loaders, evaluator, validation loop and script defaults.

Importing the package registers the built-in tasks; see utils/tasks/base.py for the interface.
"""

from utils.tasks import classify, detect, segment  # noqa: F401  (each registers its task)
from utils.tasks.base import Task, TrainBatch, check_script_task, get_task, known_tasks, register_task, task_of

__all__ = ["Task", "TrainBatch", "check_script_task", "get_task", "known_tasks", "register_task", "task_of"]
