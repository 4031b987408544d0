"""Task evaluation under routing strategies: lm-eval's task definitions, scores with CIs, active experts.

>>> from moescope.evaluate import TASKS
>>> sorted(TASKS)
['corpus', 'hellaswag', 'lambada', 'mc', 'wikitext']
"""

from moescope.evaluate.run import EvalReport, EvalRow, evaluate, format_table, write_outputs
from moescope.evaluate.scorer import Scorer
from moescope.evaluate.tasks import TASKS, Task, parse_task

__all__ = [
    "TASKS",
    "EvalReport",
    "EvalRow",
    "Scorer",
    "Task",
    "evaluate",
    "format_table",
    "parse_task",
    "write_outputs",
]
