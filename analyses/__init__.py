"""analyses."""

from .ap import average_precision as average_precision
