"""analyses: questions asked of a store (AP neuron ranking, selections, Gini, magnitudes, ...)."""

from .ap import average_precision as average_precision
from .gini import gini as gini
