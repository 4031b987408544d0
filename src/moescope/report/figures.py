"""Kept for code written before :mod:`moescope.core.figures`: the same functions, under their old home."""

from moescope.core.figures import heatmap, save_figure, save_table, subplot_grid

__all__ = ["heatmap", "save_figure", "save_table", "subplot_grid"]
