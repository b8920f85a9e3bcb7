"""Reports: JSON/CSV writers, matplotlib figures and one self-contained HTML page.

* :mod:`hesslens.files` -- atomic writers and JSON-safe conversion;
* :mod:`hesslens.report.style` -- the one figure style: size, resolution, layout, colours,
  PNG bytes and files (every figure is made there);
* :mod:`hesslens.report.figures` -- PNG figures from plain data (Agg backend);
* :mod:`hesslens.report.html` -- :class:`Report` built from :class:`Section` objects holding
  :class:`Paragraph`, :class:`Table`, :class:`Figure` (base64 PNG) and :class:`Code` blocks;
* :mod:`hesslens.report.layer_report` -- the layer study's files.

Example:
    >>> r = Report("Title")
    >>> _ = r.section("Part", Paragraph("text"))
    >>> "<h2>Part</h2>" in r.render()
    True
"""

from hesslens.files import to_jsonable, write_bytes, write_csv, write_json, write_text
from hesslens.report.html import Code, Figure, Paragraph, Report, Section, Table, format_value
from hesslens.report.layer_report import (
    CSV_COLUMNS,
    FIGURES,
    build_layer_report,
    layer_rows,
    make_layer_figures,
    write_layer_study,
)

__all__ = [
    "CSV_COLUMNS",
    "FIGURES",
    "Code",
    "Figure",
    "Paragraph",
    "Report",
    "Section",
    "Table",
    "build_layer_report",
    "format_value",
    "layer_rows",
    "make_layer_figures",
    "to_jsonable",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_layer_study",
    "write_text",
]
