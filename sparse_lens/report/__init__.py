"""Self-contained HTML reports: figures embedded as base64 PNG, tables, preformatted text."""

from sparse_lens.report.html import Figure, Section, Table, format_value, render_report, write_report

__all__ = ["Figure", "Section", "Table", "format_value", "render_report", "write_report"]
