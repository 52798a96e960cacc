r"""The registry: every name a config can pick, with its function and typed knobs.

One plain dict per family, name -> ``Entry`` (a small frozen dataclass), each in its own file of
this package (``losses.py``, ``selections.py``, ``teachers.py``, ``regimes.py``, ``options.py``,
``run.py``; the types in ``knobs.py``); nothing registers itself on import, so what exists is
what these files list. To add a term, add an entry there (and its function where its family lives);
``train/terms.py`` checks configs against these dicts.

    LOSS_TERMS[name]   a loss term: a divergence (``divergences.CORES``), ``ce``, ``sinkhorn``,
                       the entropies, a feature term, or a bridge term (``alm``, ``uld``,
                       ``mined``, ``dskd``); ``family`` says which path computes it ("logit":
                       the fused head, "feature", "bridge"; a bridge term's ``parts`` are its
                       normaliser groups).
                       The label of ``config.losses`` picks the name unless the term sets
                       ``divergence=<name>`` (logit terms only).
    SELECTIONS[kind]   a token-selection rule (``loss_options.selection.kind``); ``fn`` is the
                       rule (``train/selection_rules.py``).
    TEACHERS[kind]     a teacher kind (``config.teacher.kind``); ``fn`` is its class in
                       ``teachers``, ``supplies`` what it can give the terms.
    REGIMES[name]      a training regime (``regime_of(config)``); ``fn`` is its batch source
                       (``train/batch_sources.py``); ``ONPOLICY_KNOBS`` the knobs of
                       ``config.onpolicy``.
    OPTIONS            the knobs of ``config.loss_options`` (a dict of ``Knob``).
    MODEL_KNOBS        the model block a model-backed teacher reads (``init``, ``config``, ...).
    RENAMED            old knob name -> new name, per scope (an old name fails with the hint).
    RUN_BLOCKS[block]  the knobs of ``config.train``, ``optimizer``, ``eval`` and ``data``
                       (``run.py``); ``REQUIRED`` the ones a training run needs.

``Entry(name, family, fn, doc, knobs, needs, supplies, tau_squared, alpha)``: ``knobs`` maps a
knob name to a ``Knob(kind, default, doc, low, high, open_low, choices, schedule, to_fn)``: its
type, default, range or choices and a one-line doc; ``needs`` is what the term requires from the
rest of the config: "teacher" (a teacher distribution), "hidden_states" / "qkv" (a teacher that
supplies them), "bridge" (``config.bridge``), "reference" (``config.reference``), "pairs" (a
preference-pairs data source, ``config.data.source="pairs"``), "total_steps".
"""

from distill_jax.train.registry.knobs import WEIGHT, Entry, Knob
from distill_jax.train.registry.losses import LOSS_TERMS
from distill_jax.train.registry.options import OPTIONS, RENAMED
from distill_jax.train.registry.regimes import ONPOLICY_KNOBS, REGIMES, regime_of
from distill_jax.train.registry.run import REQUIRED, RUN_BLOCKS
from distill_jax.train.registry.selections import SELECTIONS
from distill_jax.train.registry.teachers import MODEL_KNOBS, TEACHERS

__all__ = [
    "LOSS_TERMS",
    "MODEL_KNOBS",
    "ONPOLICY_KNOBS",
    "OPTIONS",
    "REGIMES",
    "RENAMED",
    "REQUIRED",
    "RUN_BLOCKS",
    "SELECTIONS",
    "TEACHERS",
    "WEIGHT",
    "Entry",
    "Knob",
    "regime_of",
]
