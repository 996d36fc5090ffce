"""Host-side data: label maps, dataset layouts, decoding, grain pipelines.

Everything under ``data/`` is numpy-only (it runs in grain workers) and
imports nothing from the rest of the package.
"""
