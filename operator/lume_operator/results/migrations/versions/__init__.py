"""Revisions of the result store schema; each spells out its own DDL and never imports models."""
