"""The lab's pages as Jinja2 templates: plain server-rendered HTML with inline CSS and a little
inline JavaScript (no external assets: the API server may have no internet), large type and
thumbnails, and the research-use notice on every page."""

from __future__ import annotations

from typing import Any

from jinja2 import DictLoader, Environment, StrictUndefined

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · WBC lab</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; font-size: 18px;
       margin: 0; color: #1b1f24; background: #f6f7f9; }
header { background: #017cee; color: #fff; padding: 10px 24px; display: flex; gap: 24px; align-items: baseline; }
header a { color: #fff; font-weight: 600; text-decoration: none; }
header .who { margin-left: auto; font-size: 15px; }
main { padding: 16px 24px 40px; max-width: 1400px; }
h1 { font-size: 28px; margin: 8px 0 12px; }
table { border-collapse: collapse; background: #fff; }
th, td { padding: 8px 14px; border-bottom: 1px solid #d8dde3; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.notice { background: #fff4ce; border: 1px solid #e0c36a; padding: 10px 14px; border-radius: 6px; margin: 12px 0; }
.muted { color: #57606a; }
a { color: #0550ae; }
kbd { border: 1px solid #8c959f; border-bottom-width: 2px; border-radius: 4px; padding: 0 5px;
      font-size: 15px; background: #fff; font-family: ui-monospace, monospace; }
{% block style %}{% endblock %}
</style>
</head>
<body>
<header>
<a href="{{ links.drops }}">WBC lab · drops</a>
{% if drop is defined and drop %}<a href="{{ links.review }}">Review {{ drop }}</a>
<a href="{{ links.report }}">Differential report {{ drop }}</a>{% endif %}
<a href="{{ links.api_docs }}">Predictions API</a>
<span class="who">signed in as <b>{{ user }}</b>{% if not can_review %} (read only){% endif %}</span>
</header>
<main>
<p class="notice"><b>For research use only.</b> Not a diagnostic device: every result needs review by a
qualified person before any clinical use.</p>
{% block content %}{% endblock %}
</main>
{% block script %}{% endblock %}
</body>
</html>
"""

_DROPS = """{% extends "base" %}
{% block content %}
<h1>{{ heading }}</h1>
{% if not drops %}<p>No drops classified yet.</p>{% else %}
<table>
<thead><tr><th>Drop</th><th class="num">Cells</th><th class="num">Need review</th><th class="num">Reviewed</th>
<th class="num">Blasts suspected</th><th class="num">Unreadable</th><th class="num">Waiting</th><th></th></tr></thead>
<tbody>
{% for d in drops %}<tr>
<td><b>{{ d.drop or "(loose files)" }}</b></td>
<td class="num">{{ d.cells }}</td><td class="num">{{ d.needs_review }}</td><td class="num">{{ d.reviewed }}</td>
<td class="num">{% if d.blast_suspected %}<b style="color:#b3261e">{{ d.blast_suspected }}</b>
{%- else %}0{% endif %}</td>
<td class="num">{{ d.rejected }}</td><td class="num">{{ d.pending }}</td>
<td>{% if d.drop %}<a href="{{ d.review_url }}">review</a> ·
<a href="{{ d.report_url }}">differential report</a>{% endif %}</td>
</tr>{% endfor %}
</tbody>
</table>{% endif %}
<p class="muted">Predictions as a table: <a href="{{ links.csv }}">CSV</a>, <a href="{{ links.json }}">JSON</a>,
<a href="{{ links.parquet }}">Parquet</a> (filters: see the <a href="{{ links.api_docs }}">API schema</a>).</p>
{% endblock %}
"""

_REVIEW = """{% extends "base" %}
{% block style %}
.cell { display: flex; gap: 20px; background: #fff; border: 2px solid #d8dde3; border-radius: 8px;
        padding: 14px; margin: 0 0 14px; }
.cell.current { border-color: #017cee; box-shadow: 0 0 0 3px #9ccaf7; }
.cell.done { opacity: .55; }
.cell img { width: 256px; height: 256px; object-fit: contain; background: #000; border-radius: 4px; }
.facts { flex: 1; }
.facts h2 { font-size: 22px; margin: 0 0 6px; }
.blast { color: #b3261e; font-weight: 700; }
.reason { display: inline-block; background: #eef1f4; border-radius: 12px; padding: 1px 10px; margin: 2px 4px 2px 0;
          font-size: 15px; }
.top td { padding: 3px 12px 3px 0; border: 0; }
.buttons { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 10px; }
.buttons button { font-size: 17px; padding: 8px 12px; border: 1px solid #8c959f; border-radius: 6px;
                  background: #fff; cursor: pointer; }
.buttons button:hover { background: #e7f1fd; }
.buttons button.unusable { border-color: #b3261e; }
.buttons button.skip { border-style: dashed; }
.status { font-weight: 600; margin-top: 8px; }
.keys { background: #fff; border: 1px solid #d8dde3; padding: 8px 14px; border-radius: 6px; }
{% endblock %}
{% block content %}
<h1>Review queue · drop {{ drop }}</h1>
<p>{{ queue|length }} cells to review ({{ reviewed }} reviewed so far): suspected blasts first, then the least
confident.</p>
<p class="keys">Keyboard: {% for label in labels %}<kbd>{{ label.key }}</kbd> {{ label.name }}
{%- if not loop.last %} · {% endif %}{% endfor %} ·
<kbd>s</kbd> skip · <kbd>↑</kbd>/<kbd>↓</kbd> previous/next cell.
A decision is saved at once and moves to the next cell.</p>
{% if not can_review %}
<p class="notice">You may look at the queue; recording a decision needs edit rights.</p>
{% endif %}
<p id="message" class="status" role="status"></p>
{% for c in queue %}
<section class="cell{% if c.latest_review %} done{% endif %}" data-index="{{ loop.index0 }}" data-path="{{ c.path }}"
 data-sha="{{ c.sha256 }}" data-version="{{ c.model_version }}">
<img src="{{ c.image_url }}" alt="cell {{ c.path }}" loading="lazy">
<div class="facts">
<h2>{{ loop.index }}. {{ c.name }}</h2>
<div>Model {{ c.model_version }} says <b>{{ c.predicted_class }}</b> ({{ "%.0f" % (c.confidence * 100) }} %)
{% if c.blast_suspected %}<span class="blast">· blast suspected</span>{% endif %}</div>
<table class="top">{% for t in c.top_classes %}
<tr><td>{{ t["class"] }}</td><td class="num">{{ "%.1f" % (t.probability * 100) }} %</td></tr>
{% endfor %}</table>
<div>Why: {% for r in c.reasons %}<span class="reason">{{ r }}</span>
{%- else %}<span class="muted">blast rule</span>{% endfor %}</div>
<div class="buttons">
{% for label in labels %}
<button type="button" data-label="{{ label.name }}"{% if label.name == "unusable" %} class="unusable"{% endif %}
 {% if not can_review %}disabled{% endif %}><kbd>{{ label.key }}</kbd> {{ label.title }}</button>
{% endfor %}
<button type="button" class="skip" data-label="skip"><kbd>s</kbd> skip</button>
</div>
<div class="status">
{%- if c.latest_review %}Reviewed: {{ c.latest_review.label }} by {{ c.latest_review.reviewer }}{% endif -%}
</div>
</div>
</section>
{% else %}<p>Nothing in this drop needs review.</p>{% endfor %}
<p><a href="{{ links.report }}">Open the differential report of {{ drop }}</a></p>
{% endblock %}
{% block script %}
<script>
(function () {
  const endpoint = {{ review_endpoint|tojson }};
  const keys = {{ keymap|tojson }};
  const cells = Array.from(document.querySelectorAll("section.cell"));
  const message = document.getElementById("message");
  let current = cells.findIndex(c => !c.classList.contains("done"));
  if (current < 0) current = 0;
  function select(i) {
    if (!cells.length) return;
    current = Math.max(0, Math.min(cells.length - 1, i));
    cells.forEach((c, j) => c.classList.toggle("current", j === current));
    cells[current].scrollIntoView({block: "center"});
  }
  function next() {
    const after = cells.findIndex((c, j) => j > current && !c.classList.contains("done"));
    select(after >= 0 ? after : Math.min(current + 1, cells.length - 1));
  }
  async function decide(index, label) {
    const cell = cells[index];
    if (!cell) return;
    if (label === "skip") { message.textContent = "Skipped " + cell.dataset.path; select(index); next(); return; }
    const response = await fetch(endpoint, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "Accept": "application/json"},
      body: JSON.stringify({path: cell.dataset.path, sha256: cell.dataset.sha, label: label,
                            model_version: cell.dataset.version}),
    });
    if (response.ok) {
      const row = await response.json();
      cell.classList.add("done");
      cell.querySelector(".status").textContent = "Reviewed: " + row.label + " by " + row.reviewer;
      message.textContent = "Saved: " + cell.dataset.path + " is " + row.label;
      select(index); next();
    } else {
      let detail = response.statusText;
      try { detail = (await response.json()).detail; } catch (e) {}
      message.textContent = "Not saved (" + response.status + "): " + detail;
    }
  }
  cells.forEach((cell, i) => cell.querySelectorAll("button[data-label]").forEach(b =>
    b.addEventListener("click", () => decide(i, b.dataset.label))));
  document.addEventListener("keydown", event => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "ArrowDown") { event.preventDefault(); select(current + 1); return; }
    if (event.key === "ArrowUp") { event.preventDefault(); select(current - 1); return; }
    const label = keys[event.key.toLowerCase()];
    if (label) { event.preventDefault(); decide(current, label); }
  });
  select(current);
})();
</script>
{% endblock %}
"""

_environment = Environment(
    loader=DictLoader({"base": _BASE, "drops": _DROPS, "review": _REVIEW}),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(name: str, **context: Any) -> str:
    """The page ``name`` (``drops`` or ``review``) with ``context``."""
    return _environment.get_template(name).render(**context)
