"""The dashboard's CSS (one <style> element inside the dashboard, so it works in Lab, Notebook and Voila)."""

from __future__ import annotations

__all__ = ["CSS"]

CSS = """
<style>
.tlw-dashboard { font-size: 13px; border: 1px solid #e0e0e0; border-radius: 6px; padding: 6px 8px; }
.tlw-dashboard .tlw-title { font-weight: 600; font-size: 14px; margin-right: 12px; }
.tlw-status { font-family: var(--jp-code-font-family, monospace); font-size: 12px; }
.tlw-status-text { background: #f5f5f5; border-radius: 4px; padding: 2px 8px; }
.tlw-state-running { background: #e3f2fd; }
.tlw-stage { border-radius: 14px !important; font-family: var(--jp-code-font-family, monospace); }
.tlw-stage.tlw-stage-current { outline: 3px solid #1565c0; outline-offset: 1px; font-weight: 700; }
.tlw-arrow { color: #9e9e9e; padding: 0 2px; }
.tlw-error { color: #b71c1c; }
.tlw-error-item { border-left: 4px solid #c62828; background: #ffebee; padding: 3px 8px; margin: 2px 0; }
.tlw-error-item pre, .tlw-record pre { max-height: 200px; overflow: auto; font-size: 11px; }
.tlw-record-view, .tlw-graph {
  border: 1px solid #eeeeee;
  border-radius: 4px;
  padding: 4px 6px;
  margin-top: 4px;
}
.tlw-record-head { margin-bottom: 4px; }
.tlw-record-error { color: #b71c1c; }
.tlw-record-warning b:last-of-type { color: #ef6c00; }
.tlw-table, .tlw-kv { border-collapse: collapse; font-size: 12px; margin: 4px 0; }
.tlw-table th, .tlw-table td, .tlw-kv th, .tlw-kv td {
  border-bottom: 1px solid #eeeeee;
  padding: 1px 8px;
  text-align: left;
}
.tlw-table td { font-family: var(--jp-code-font-family, monospace); }
.tlw-kv th { font-weight: normal; color: #616161; }
.tlw-bar-row { display: flex; gap: 6px; align-items: center; font-size: 11px; }
.tlw-bar { display: inline-block; height: 8px; background: #6baed6; }
.tlw-name {
  display: inline-block;
  border-radius: 3px;
  padding: 0 4px;
  margin: 1px;
  font-family: var(--jp-code-font-family, monospace);
  font-size: 11px;
}
.tlw-reached { background: #e8f5e9; }
.tlw-unreached { background: #ffcdd2; font-weight: 700; }
.tlw-frozen { background: #eeeeee; color: #757575; }
.tlw-swatch { display: inline-block; width: 10px; height: 10px; background: #d0d0d0; }
.tlw-module { font-family: var(--jp-code-font-family, monospace); font-size: 12px; }
.tlw-finding-row { border-bottom: 1px solid #f5f5f5; }
.tlw-finding-resolved { opacity: 0.55; filter: grayscale(100%); }
.tlw-fixes { gap: 2px; margin: 0 4px; }
.tlw-fix { font-size: 12px; }
.tlw-fix-done { color: #2e7d32; font-size: 12px; padding: 0 8px 4px 12px; }
.tlw-legend { display: flex; align-items: flex-start; gap: 8px; font-size: 11px; margin-left: 130px; }
/* ipywidgets' HTML content has a 28px line height: absolutely placed key labels would overflow. */
.tlw-legend, .tlw-legend * { line-height: 14px; }
.tlw-legend-state { padding: 0 6px; border-radius: 2px; border: 1px solid #bdbdbd; white-space: nowrap; }
.tlw-legend-scale { flex: 0 0 260px; }
.tlw-legend-bar { height: 12px; border-radius: 2px; }
.tlw-legend-ticks { position: relative; height: 14px; color: #616161; }
.tlw-legend-ticks span { position: absolute; transform: translateX(-50%); white-space: nowrap; }
.tlw-heatmap-tooltip { font-size: 12px; background: white; border: 1px solid #bdbdbd; border-radius: 3px; }
.tlw-heatmap-tooltip, .tlw-heatmap-tooltip * { line-height: 16px; }
.tlw-legend-bands { position: relative; height: 14px; }
.tlw-legend-band, .tlw-legend-fast, .tlw-legend-slow {
  position: absolute;
  border-top: 2px solid #1f9e50;
  text-align: center;
  color: #1f9e50;
  font-size: 10px;
  white-space: nowrap;
}
.tlw-legend-fast { border-top-color: #f4a340; color: #b86e00; }
.tlw-legend-slow { border-top-color: #6baed6; color: #2171b5; }
.tlw-legend-hint { color: #9e9e9e; margin-left: auto; white-space: nowrap; }
</style>
"""
