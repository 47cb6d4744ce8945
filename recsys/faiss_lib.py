"""faiss, imported with its loader's INFO lines kept off the console.

faiss's loader tries its AVX-512 and AVX2 builds first and logs each miss at INFO through the
logger ``faiss.loader`` ("No module named 'faiss.swigfaiss_avx512'"), which reads like a failure
wherever INFO reaches the console (Ray workers). Those lines are only INFO; the loader's own
warnings and errors still show, and a faiss that cannot load at all raises ImportError here.
Import faiss from this module: ``from recsys.faiss_lib import faiss``.
"""

import logging

logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import faiss  # noqa: E402  (after the logger level: the loader logs while faiss is imported)

__all__ = ["faiss"]
