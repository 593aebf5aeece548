"""gradsense: can a language model read the gradient of its own loss as a semantic instruction?"""

from gradsense.errors import GradsenseError
from gradsense.gradients import activation_gradients
from gradsense.models import load_model
from gradsense.oracle import virtual_step, virtual_steps
from gradsense.teacher import TemplateTeacher, parse_label

__all__ = [
    "GradsenseError",
    "TemplateTeacher",
    "activation_gradients",
    "load_model",
    "parse_label",
    "virtual_step",
    "virtual_steps",
]
__version__ = "0.1.0"
