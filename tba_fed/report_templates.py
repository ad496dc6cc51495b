"""report.html's Jinja2 templates, as Python strings: Flower bundles only .py, .toml, .md, .yaml and .json files
into the app it ships to the ServerApp (its FAB), so template files would be missing where the server writes its
report."""

TEMPLATES: dict[str, str] = {
    "base.html.j2": """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="tba-fed report">
{# Self-contained: no script, no link, no remote URL. The CSP says so to the browser too. #}
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{% block title %}{% endblock %}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #c62828; font-weight: bold; }
.note { color: #555; font-size: 0.9em; } code { font-size: 0.9em; word-break: break-all; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.bar { width: 30em; max-width: 100%; height: 1.2em; background: #eee; border: 1px solid #aaa; }
.bar > div { height: 100%; background: #1565c0; } .bar > div.over { background: #c62828; }
</style>
</head>
<body>
{% block body %}{% endblock %}
</body>
</html>
""",
    "run.html.j2": """\
{% extends "base.html.j2" %}
{% set model = report.model.name if report.model else "model" %}
{% block title %}tba-fed report: {{ model }}, plan {{ report.plan }}{% endblock %}
{% block body %}
<h1>TBA compression of {{ model }}: plan <span id="plan">{{ report.plan }}</span></h1>
<ul>
<li>map <code>{{ report.get("map", "linear") }}</code>; token mode <code>{{ report.token_mode }}</code>; bias {{ report.bias }}; ridge {{ report.ridge }}{% if report.profile is defined %}; profile <b>{{ report.profile }}</b>{% endif %}</li>
<li>calibration images: <span id="calibration-images">{{ report.calibration_images }}</span>; held-out images: {{ report.holdout_images }}</li>
<li>parameters: {{ "{:,}".format(report.parameters.original) }} → <span id="params-compressed">{{ "{:,}".format(report.parameters.compressed) }}</span> (removed {{ "{:,}".format(report.parameters.removed) }}; paper's Table-1 convention {{ "{:,}".format(report.parameters.paper_removed) }})</li>
</ul>

<h2>Similarity of block outputs</h2>
{% if heatmap %}
<p>Each cell (s, e) is the cost of dropping blocks s+1..e (relative mse, log10); the spans the budget chose are outlined in red.</p>
<img id="heatmap" alt="similarity heatmap with the chosen plan {{ report.plan }} outlined" src="data:image/png;base64,{{ heatmap }}">
{% else %}
<p class="note">The plan was given, so no similarity was computed (a budget run shows the heatmap here).</p>
{% endif %}

<h2>Fit of each span</h2>
<table id="spans">
<tr><th>span</th><th>kind</th><th>removed params</th><th>cond(G)</th><th>calib. rel. err</th><th>R²</th><th>held-out rel. err</th><th>identity held-out rel. err</th><th>map / identity</th><th>verdict</th></tr>
{% for s in spans %}
<tr><td>{{ s.span }}</td><td>{{ s.kind }}</td><td class="n">{{ "{:,}".format(s.removed) }}</td><td class="n">{{ s.condition_number | num }}</td>
<td class="n">{{ s.calibration_relative_error | num }}</td><td class="n">{{ s.calibration_r2 | num }}</td>
<td class="n">{{ s.holdout_relative_error | num }}</td><td class="n">{{ s.identity_holdout_relative_error | num }}</td>
<td class="n">{{ s.ratio | num(".3f") }}</td><td class="{{ 'ok' if s.ratio is not none and s.ratio < 1 else 'bad' if s.ratio is not none else '' }}">{{ s.verdict }}</td></tr>
{% endfor %}
</table>
<p class="note">Relative error = Σ‖x_e − T(x_s)‖² / Σ‖x_e‖² (a folded map: over r = x_e − h_s); the identity column is the error of simply dropping the blocks. A map is worth keeping only where its held-out error is below the identity's.{% if report.privacy is defined %} In this private run the error columns come from noisy sums: with few images per site the noise can swamp them, so read the verdict with the held-out image count above.{% endif %}</p>

{% if report.evaluation is defined %}
{% set ev = report.evaluation %}
<h2>Accuracy</h2>
<p>{{ ev.probe }} (ridge {{ ev.probe_ridge }}), fitted on {{ ev.probe_images }} calibration images of all sites, tested on their {{ ev.test_images }} held-out images.</p>
<table id="accuracy">
<tr><th>site</th><th>held-out images</th><th>original</th><th>compressed</th></tr>
{% for site, row in ev.sites.items() %}
<tr><td>{{ site }}</td><td class="n">{{ row.images }}</td><td class="n">{{ row.original | num(".4f") }}</td><td class="n">{{ row.compressed | num(".4f") }}</td></tr>
{% endfor %}
<tr><th>pooled</th><th class="n">{{ ev.test_images }}</th><th class="n" id="accuracy-original">{{ ev.pooled.original | num(".4f") }}</th><th class="n" id="accuracy-compressed">{{ ev.pooled.compressed | num(".4f") }}</th></tr>
</table>
{% endif %}

{% if contributions is not none %}
{% set fed = report.federation %}
<h2>Sites' contributions</h2>
<p>{{ fed.sites_connected }} site(s) connected; maps sha256 <code>{{ fed.maps_sha256 }}</code>.{% if superlink_checks %} Verified before round 1:{% endif %}</p>
{% if superlink_checks %}<ul>{% for line in superlink_checks %}<li><code>{{ line }}</code></li>{% endfor %}</ul>{% endif %}
<table id="contributions">
<tr><th>site</th><th>images</th><th>array bytes sent</th><th>array bytes received</th><th>rounds ok</th><th>status</th><th>reasons</th></tr>
{% for c in contributions %}
<tr><td>{{ c.site }}</td><td class="n">{{ c.images if c.images is not none else "" }}</td><td class="n">{{ "{:,}".format(c.bytes_sent) }}</td><td class="n">{{ "{:,}".format(c.bytes_received) }}</td>
<td class="n">{{ c.rounds_ok }}/{{ c.rounds }}</td><td class="{{ 'ok' if c.status == 'ok' else 'bad' }}">{{ c.status }}</td><td>{% for r in c.reasons %}{{ r }}{% if not loop.last %}<br>{% endif %}{% endfor %}</td></tr>
{% endfor %}
</table>
<table id="rounds">
<tr><th>round</th><th>seconds</th><th>sites ok</th></tr>
{% for rnd in fed.rounds %}
<tr><td>{{ rnd.name }}</td><td class="n">{{ rnd.seconds | num(".1f") }}</td><td class="n">{{ rnd.sites.values() | selectattr("status", "equalto", "ok") | list | length }}/{{ rnd.sites | length }}</td></tr>
{% endfor %}
</table>
{% endif %}

<h2>Privacy</h2>
{% if report.privacy is defined %}
{% set p = report.privacy %}
<ul>
<li>(ε, δ) = (<span id="epsilon">{{ p.epsilon | num("g") }}</span>, {{ p.delta | num("g") }}) spent by this run at each site that released, over {{ p.releases | length }} release(s) ({{ p.releases | join(", ") }}), {{ p.accountant | upper }} accounting; noise multiplier σ = {{ p.noise_multiplier | num }}</li>
<li>one image is the unit protected (add/remove adjacency); under replace-one adjacency ε ≤ {{ p.epsilon_replace_one | num(".3g") }}</li>
<li>{{ p.aggregation }}; {{ p.sites_summed }} sites summed; noise: {{ p.noise }}</li>
<li>each site's budget, and all it has spent, is in its own ledger: <code>tba-fed privacy report SITE.yaml --html OUT.html</code> at the site</li>
</ul>
{% if contributions is not none %}
<table id="epsilon-per-site">
<tr><th>site</th><th>ε of this run</th><th>δ</th></tr>
{% for c in contributions if c.site != "secure sum" %}
<tr><td>{{ c.site }}</td><td class="n">{{ p.epsilon | num("g") if c.status == "ok" else "0 to " ~ p.epsilon | num("g") ~ " (it failed a round: its ledger says)" }}</td><td class="n">{{ p.delta | num("g") }}</td></tr>
{% endfor %}
</table>
<p class="note">A site's budget is its own (its YAML), never the server's to know: each site's ε spent against its budget is in its site report.</p>
{% endif %}
{% if curve %}
<h3>This run on the privacy-utility curve</h3>
<img id="privacy-utility" alt="privacy-utility curve with this run's point" src="data:image/png;base64,{{ curve.png }}">
<p class="note">The curve is the study of docs/privacy-utility.md ({{ curve.setting }}): {{ curve.variant }}, {{ curve.mode }} aggregation, {{ curve.images }} images, span {{ curve.span }}. This run's points are its own held-out error relative to dropping the blocks (from noisy held-out sums), at its ε: comparable with the curve only as far as its model, data and span match.</p>
{% if not curve.points %}<p class="bad">This run had no held-out images, so it has no point on the curve (raise data.holdout_fraction).</p>{% endif %}
<table id="curve-points">
<tr><th>span</th><th>ε</th><th>held-out error / identity's</th></tr>
{% for pt in curve.points %}<tr><td>{{ pt.span }}</td><td class="n">{{ pt.epsilon | num("g") }}</td><td class="n">{{ pt.ratio | num(".3f") }}</td></tr>{% endfor %}
</table>
{% endif %}
{% else %}
<p>Not private: the statistics were released exactly (no differential privacy noise).</p>
{% endif %}

{% if audit %}
<h2>Audit log</h2>
<p>{{ audit.path }}: <span class="{{ 'ok' if audit.ok else 'bad' }}" id="audit-status">{{ "chain intact" if audit.ok else "does NOT verify" }}</span>, {{ audit.entries }} entries when this report was written; head <code>{{ audit.head }}</code>{% if audit.ok %} (the run's result entry follows it){% endif %}.</p>
{% if audit.problems %}<ul>{% for problem in audit.problems %}<li class="bad">{{ problem }}</li>{% endfor %}</ul>{% endif %}
<p class="note">Check it again, and each site's log against it: <code>tba-fed audit verify SITE_LOG --against {{ audit.path }}</code>.</p>
{% endif %}
{% endblock %}
""",
    "site.html.j2": """\
{% extends "base.html.j2" %}
{% block title %}tba-fed site report: {{ view.site }}{% endblock %}
{% block body %}
<h1>Site <span id="site">{{ view.site }}</span>: privacy budget and audit</h1>
<p class="note">From this site's own files: its YAML (the policy), its ledger <code>{{ view.ledger }}</code> and its audit log. The server never sees this site's budget.</p>

<h2>ε spent against the budget</h2>
<p>ε spent <b id="epsilon-spent">{{ view.spent | num(".4f") }}</b> of the budget <b id="epsilon-budget">{{ view.budget | num("g") }}</b> at δ = {{ view.policy.delta | num("g") }} ({{ view.policy.accountant | upper }} composition of every release); remaining <b id="epsilon-remaining">{{ view.remaining | num(".4f") }}</b>.</p>
<div class="bar" role="img" aria-label="{{ (100 * view.fraction) | num('.1f') }}% of the budget spent"><div class="{{ 'over' if view.over else '' }}" style="width: {{ (100 * view.fraction) | num('.1f') }}%"></div></div>
<p class="note">One image is the unit protected, under add/remove-one-image adjacency; under replace-one adjacency the same releases give ε ≤ {{ view.replace_one | num(".4f") }}.</p>

<h2>Policy</h2>
<table id="policy">
<tr><th>require DP</th><td>{{ view.policy.require_dp }}</td></tr>
<tr><th>releases allowed</th><td>{{ view.policy.releases | join(", ") }}</td></tr>
<tr><th>minimum images per release</th><td>{{ view.policy.min_images }}</td></tr>
<tr><th>secure aggregation</th><td>{{ view.policy.secure_aggregation }} (noise split over {{ view.policy.min_noise_sites }} to {{ view.policy.max_noise_sites }} sites)</td></tr>
<tr><th>seeded noise allowed</th><td>{{ view.policy.allow_seeded_noise }}</td></tr>
</table>

<h2>Runs</h2>
{% if view.runs %}
<table id="runs">
<tr><th>run</th><th>ε of the run</th><th>δ</th><th>releases recorded</th><th>images (largest release)</th></tr>
{% for run in view.runs %}
<tr><td>{{ run.run_id }}</td><td class="n">{{ run.epsilon | num("g") }}</td><td class="n">{{ run.delta | num("g") }}</td><td>{{ run.releases | join(", ") }}</td><td class="n">{{ run.images }}</td></tr>
{% endfor %}
</table>
<table id="ledger">
<tr><th>time</th><th>run</th><th>release</th><th>σ (accounted)</th><th>σ applied here</th><th>images</th><th>noise</th><th>aggregation</th><th>produced</th></tr>
{% for e in view.entries %}
<tr><td>{{ e.time }}</td><td>{{ e.run_id }}</td><td>{{ e.release }}</td><td class="n">{{ e.noise_multiplier | num }}</td><td class="n">{{ e.site_noise_multiplier | num }}</td>
<td class="n">{{ e.images }}</td><td>{{ e.noise }}</td><td>{{ e.aggregation }}</td><td>{{ "yes" if e.payload_sha256 else "granted, not produced" }}</td></tr>
{% endfor %}
</table>
{% else %}
<p>No release recorded yet: nothing spent.</p>
{% endif %}

<h2>Audit log</h2>
{% if view.audit %}
{% set a = view.audit %}
<p>{{ a.path }}: <span class="{{ 'ok' if a.ok else 'bad' }}" id="audit-status">{{ "chain intact" if a.ok else "does NOT verify" }}</span>, {{ a.entries }} entries; head <code>{{ a.head }}</code>.
Requests by status: {% for status, count in a.statuses.items() %}{{ status }} {{ count }}{% if not loop.last %}, {% endif %}{% endfor %}.</p>
{% if a.problems %}<ul>{% for problem in a.problems %}<li class="bad">{{ problem }}</li>{% endfor %}</ul>{% endif %}
<p class="note">The chain alone cannot show entries cut from its end: check it against the server's log, <code>tba-fed audit verify {{ a.path }} --against SERVER_LOG</code>.</p>
{% else %}
<p>No audit log at <code>{{ view.audit_path }}</code> yet (the site has served no request).</p>
{% endif %}
{% endblock %}
""",
}
