"""Import time in a fresh interpreter (asv runs each `timeraw_` benchmark's returned code in a new process)."""


def timeraw_import_gpurnn():
    return "import gpurnn"


def timeraw_import_gpurnn_api():
    """The package plus the API most scripts touch: nn, optim, models (still no Numba, CuPy or torch)."""
    return "import gpurnn; gpurnn.nn, gpurnn.optim, gpurnn.models"
