"""Reports: one self-contained HTML page of a trace (:func:`build_report`, ``moescope report``) and a
Markdown page gathering the figures of output folders (:func:`write_report`).

``save_figure``, ``save_table``, ``heatmap`` and ``subplot_grid`` moved to :mod:`moescope.core.figures`;
they are still importable from here for code written before.
"""

from moescope.core.figures import heatmap, save_figure, save_table, subplot_grid
from moescope.report.build import build_report
from moescope.report.gather import write_report

__all__ = ["build_report", "heatmap", "save_figure", "save_table", "subplot_grid", "write_report"]
