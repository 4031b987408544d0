"""Typed core beneath the stages: families, sources, figures, estimators, outputs."""
