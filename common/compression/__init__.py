"""Compressed pushes: codecs, error feedback and their wire layout.

* :mod:`common.compression.codecs`: ``--compress`` values, encoding, pure decoding, checks.
* :mod:`common.compression.feedback`: :class:`Compressor`, the sender's residual per key.
* :mod:`common.compression.framing`: the ``compressed`` header field and the parts' frames.
"""

from common.compression.codecs import CODECS, NONE, TOPK, Encoded, Spec, check, decompress, parse
from common.compression.feedback import Compressor
from common.compression.framing import FIELD, expand, pack

__all__ = ["CODECS", "NONE", "TOPK", "Compressor", "Encoded", "FIELD", "Spec", "check", "decompress", "expand",
           "pack", "parse"]
