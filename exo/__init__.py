"""exo: one large language model across several ordinary machines, served as one endpoint."""

__version__ = "0.1.0"
