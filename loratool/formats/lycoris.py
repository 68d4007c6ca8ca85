"""LyCORIS files: kohya naming (``lycoris.kohya``) or the ``lycoris_`` prefix
(``lycoris.create_lycoris``), with LoCon (``lora_mid``), LoHa (``hada_*``), LoKr (``lokr_*``)
and full (``diff``) modules. Key layout and tensor mapping: :mod:`loratool.formats.kohya`.

ΔW per kind (:mod:`loratool.delta`, checked against lycoris 4.1.3's own rebuild code):
LoCon ``s·up@down`` (Tucker: ``Σ up[o,p]·mid[p,q]·down[q,i]``), LoHa
``s·(w1a@w1b)⊙(w2a@w2b)``, LoKr ``s·kron(w1, w2)`` (s = 1 when both factors are whole),
full ``diff``; s = alpha / r.
"""

from __future__ import annotations

from itertools import repeat
from pathlib import Path

from loratool.adapter import Adapter
from loratool.formats import kohya

NAME = "lycoris"


def detect(src) -> bool:
    """Kohya-named files with any LyCORIS-only key (hada_, lokr_, diff, lora_mid) or ``lycoris_`` prefix."""
    keys = src.keys
    return kohya.claims(keys) and (kohya.has_lycoris_keys(keys) or any(map(str.startswith, keys, repeat("lycoris_"))))


def read(src, opts) -> Adapter:
    return kohya.read(src, opts, source_format=NAME)


def write(adapter: Adapter, out: Path, opts) -> list[Path]:
    """Same keys as the kohya writer (which already writes every LyCORIS kind)."""
    return kohya.write(adapter, out, opts)
