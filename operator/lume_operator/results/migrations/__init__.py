"""Alembic migrations of the result store, run in code by `lume_operator.results.store.upgrade`.

A package (with `versions/` one too) so the revisions ship in the wheel; no alembic.ini is used.
"""
