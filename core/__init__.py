"""What every stage shares: data formats, the Matryoshka function, models, files, errors, metrics.

Imports no stage (training, index, service, benchmarks); they all import it.
"""

__version__ = "0.1.0"
