"""Reports: :func:`write_report` gathers every figure of the output folders into one page.

``save_figure``, ``save_table``, ``heatmap`` and ``subplot_grid`` moved to :mod:`moescope.core.figures`;
they are still importable from here for code written before.
"""

from moescope.core.figures import heatmap, save_figure, save_table, subplot_grid
from moescope.report.gather import write_report

__all__ = ["heatmap", "save_figure", "save_table", "subplot_grid", "write_report"]
