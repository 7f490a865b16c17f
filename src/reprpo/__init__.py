"""reprpo: preference optimisation on outputs or internal representations, with honest OOD evaluation."""

__version__ = "0.1.0"
