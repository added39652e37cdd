"""Demo applications built on ``consolidator_hf`` (never imported by the library itself).

- :mod:`.offline_default`: the offline default run of ``scripts/finetune.py`` (digits 0-4 -> 5-9);
- :mod:`.mini_vtab`: the offline mini-VTAB benchmark (``scripts/mini_vtab.py``);
- :mod:`.pretraining`: the one Trainer-based backbone pretraining both use.
"""
