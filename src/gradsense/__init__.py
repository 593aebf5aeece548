"""gradsense: can a language model read the gradient of its own loss as a semantic instruction?"""

from gradsense.errors import GradsenseError
from gradsense.models import load_model

__all__ = ["GradsenseError", "load_model"]
__version__ = "0.1.0"
