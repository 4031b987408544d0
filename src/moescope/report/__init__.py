"""Figures that describe themselves: each PNG is saved beside a CSV of exactly the plotted numbers."""

from moescope.core.figures import heatmap, save_figure, save_table, subplot_grid

__all__ = ["heatmap", "save_figure", "save_table", "subplot_grid"]
