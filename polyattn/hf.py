"""``import polyattn.hf``: the Hugging Face transformers integration, :mod:`polyattn.integrations.hf`.

    >>> import polyattn.hf
    >>> polyattn.hf.register("x^3/sqrt(N)")   # -> "polyattn:x^3/sqrt(N)", an attn_implementation name
    >>> polyattn.hf.use(model, "x^3/sqrt(N)")
    >>> model.generate(ids, cache=polyattn.hf.StateCache(model))   # x^p: a fixed-size state, no KV cache

Importing it imports transformers (``pip install 'polyattn[hf]'``); ``import polyattn`` does not.
"""

from .integrations.hf import *  # noqa: F403  (one public list, in integrations/hf.py)
from .integrations.hf import __all__ as __all__
