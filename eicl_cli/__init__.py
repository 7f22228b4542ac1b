"""eicl: emergent in-context learning experiments (Chan et al. 2022), fast."""

__version__ = "0.1.0"
