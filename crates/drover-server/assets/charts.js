// Drover web UI: telemetry charts, drawn with uPlot from the JSON API the CLI uses.
//
// - A device's metrics page (`.charts[data-page=device]`): one chart per metric the device
//   reports (GET /api/v1/devices/{id}/metrics, then …/metrics/{metric} per chart) with the
//   average and, when a bucket holds several values, the min–max band; its telemetry events.
// - A fleet panel (`.fleet-panel`, on the fleet dashboard and a group's page): a metric
//   across devices (GET /api/v1/metrics/fleet: average, p50, p95, min–max band, devices
//   reporting), optionally one line per value of a tag, and the top devices
//   (GET /api/v1/metrics/top).
// - A device's page (`#device-metrics-summary`): the metrics it reports with their latest value.
//
// The range picker picks the step, and the step picks what the server reads: 1 h in 30 s
// buckets of raw points, 6 h and 24 h from the 1-minute rollups, 7 d from the 1-hour rollups
// (docs/telemetry-server.md). Ranges up to 24 h refresh every 30 s while the page is visible.
// Missing data is a gap, not a line drawn across an outage; errors are shown where the chart
// would be.
"use strict";

(function () {
  // A device's chart and a fleet aggregate take different steps: the cost of a fleet read is
  // the rows it reads (devices x stored values), so fleet charts read rollups rather than raw
  // points, and the 15-minute step over 24 h lets the server read its coarsest fitting rollup.
  const RANGES = {
    "5m": { span: 300_000, step: "5s", fleetStep: "10s", refresh: true },
    "15m": { span: 900_000, step: "10s", fleetStep: "30s", refresh: true },
    "1h": { span: 3_600_000, step: "30s", fleetStep: "1m", refresh: true },
    "6h": { span: 6 * 3_600_000, step: "1m", fleetStep: "1m", refresh: true },
    "24h": { span: 24 * 3_600_000, step: "5m", fleetStep: "15m", refresh: true },
    "7d": { span: 7 * 86_400_000, step: "1h", fleetStep: "1h", refresh: false },
  };
  const REFRESH_MS = 30_000;
  const ACCENT = "#2457c5";
  const BAND = "rgba(36, 87, 197, 0.12)";
  const EDGE = "rgba(36, 87, 197, 0.35)";
  const PALETTE = ["#2457c5", "#b54708", "#067647", "#7a2eb8", "#b42318", "#0e7490", "#a15c07", "#475467"];

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function getJson(url, signal) {
    let resp;
    try {
      resp = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" }, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError("The server did not answer: check the connection.", 0);
    }
    if (resp.status === 401 || (resp.redirected && new URL(resp.url).pathname === "/login")) {
      throw new ApiError("Your session has ended: reload the page to sign in again.", 401);
    }
    const text = await resp.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch (_) {
      body = null;
    }
    if (!resp.ok) {
      const detail = body && body.error ? body.error.message : `HTTP ${resp.status}`;
      throw new ApiError(detail, resp.status);
    }
    if (body === null) throw new ApiError("The server's answer was not JSON.", resp.status);
    return body;
  }

  const enc = encodeURIComponent;
  const isAbort = (e) => e && e.name === "AbortError";

  // ------------------------------------------------------------------ units and numbers

  /** The unit a metric's name says, as the agent names them (docs/telemetry-agent.md). */
  function unitOf(metric) {
    const m = metric.toLowerCase();
    if (m.includes("percent")) return "%";
    if (m.includes("bytes")) return "B";
    if (m.includes("celsius")) return "°C";
    if (/_ms($|\.)/.test(m)) return "ms";
    if (/(_s|_seconds)($|\.)/.test(m)) return "s";
    return "";
  }

  /**
   * Counters the agent reports as totals since boot or install (docs/telemetry-agent.md):
   * their charts show the rate per second, which is what people read.
   */
  function isCounter(metric) {
    return /(^|\.)(rx_bytes|tx_bytes|dropped|bad_lines)$/.test(metric) || /_total$/.test(metric);
  }

  /** Health first (CPU, memory, disk, temperature, network…), the agent's own metrics last. */
  function metricRank(metric) {
    if (metric.startsWith("agent.")) return 2;
    if (metric.startsWith("link.") || metric === "uptime_s") return 1;
    return 0;
  }

  function byRank(a, b) {
    return metricRank(a) - metricRank(b) || (a < b ? -1 : a > b ? 1 : 0);
  }

  /** Per-second rates between buckets of a counter; a drop (a reboot) starts again. */
  function rates(points) {
    const out = [];
    for (let i = 1; i < points.length; i++) {
      const dt = (points[i].t - points[i - 1].t) / 1000;
      const dv = points[i].avg - points[i - 1].avg;
      if (dt > 0 && dv >= 0) out.push({ t: points[i].t, avg: dv / dt, min: dv / dt, max: dv / dt, count: 1 });
    }
    return out;
  }

  function fmtNum(v) {
    if (v == null || !Number.isFinite(v)) return "—";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e15 || a < 1e-3)) return v.toExponential(2);
    const digits = a >= 100 ? 0 : a >= 10 ? 1 : 2;
    return v.toLocaleString(undefined, { maximumFractionDigits: digits });
  }

  function fmtBytes(v) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let x = Math.abs(v);
    let i = 0;
    while (x >= 1024 && i < units.length - 1) {
      x /= 1024;
      i++;
    }
    return `${fmtNum(Math.sign(v) * x)} ${units[i]}`;
  }

  function fmtSeconds(v) {
    const a = Math.abs(v);
    if (a < 120) return `${fmtNum(v)} s`;
    if (a < 7200) return `${fmtNum(v / 60)} min`;
    if (a < 172_800) return `${fmtNum(v / 3600)} h`;
    return `${fmtNum(v / 86_400)} d`;
  }

  function fmt(v, unit) {
    if (v == null || !Number.isFinite(v)) return "—";
    switch (unit) {
      case "B":
        return fmtBytes(v);
      case "B/s":
        return `${fmtBytes(v)}/s`;
      case "/s":
        return `${fmtNum(v)}/s`;
      case "s":
        return fmtSeconds(v);
      case "":
        return fmtNum(v);
      default:
        return `${fmtNum(v)} ${unit}`;
    }
  }

  /** Axis steps for bytes: powers of two, so ticks read 256 MiB rather than 268.4 MB. */
  const BYTE_INCRS = (() => {
    const out = [];
    for (let p = 0; p < 60; p++) out.push(2 ** p);
    return out;
  })();

  function yRange(unit) {
    const zeroBased = unit === "%" || unit === "B" || unit === "B/s" || unit === "/s" || unit === "devices";
    return (u, lo, hi) => {
      if (lo == null || hi == null || !Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 1];
      // A flat series sits inside an axis around its value (from 0 where that is natural),
      // never on an axis of one repeated tick.
      if (lo === hi) {
        if (hi === 0) return [0, 1];
        const d = Math.abs(hi) * 0.25;
        if (zeroBased && lo > 0) return [0, hi * 1.5];
        return [lo - d, hi + d];
      }
      if (zeroBased && lo > 0) lo = 0;
      const pad = (hi - lo) * 0.08;
      let top = hi + pad;
      if (unit === "%" && hi <= 100 && top > 100) top = 100;
      return [zeroBased && lo >= 0 ? lo : lo - pad, top];
    };
  }

  function ago(ms) {
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172_800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86_400)} days ago`;
  }

  // One time format across the console: UTC, with its zone (the server renders the same).
  const pad = (n) => String(n).padStart(2, "0");
  function utc(ms, seconds = true) {
    const d = new Date(ms);
    const day = `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
    const time = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}${seconds ? `:${pad(d.getUTCSeconds())}` : ""}`;
    return `${day} ${time} UTC`;
  }
  const localTime = (ms) => utc(ms);

  /** The time axis in UTC: hours and minutes, with the day when the range spans days. */
  function timeAxis() {
    return {
      values: (u, splits) => {
        const days = u.scales.x.max - u.scales.x.min > 86_400;
        const labels = splits.map((t) => {
          const d = new Date(t * 1000);
          const hm = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
          return days ? `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${hm}` : hm;
        });
        return labels.map((l, i) => (i > 0 && l === labels[i - 1] ? "" : l));
      },
    };
  }

  // ------------------------------------------------------------------ gaps

  function median(values) {
    const s = values.slice().sort((a, b) => a - b);
    return s.length ? s[Math.floor(s.length / 2)] : 0;
  }

  /**
   * Columns for uPlot from buckets: x in seconds, then one array per column, with a null row
   * wherever the data stops for longer than its usual cadence (at least two buckets), so an
   * outage is a gap rather than a straight line.
   */
  function gapped(times, columns, stepMs) {
    const deltas = [];
    for (let i = 1; i < times.length; i++) deltas.push(times[i] - times[i - 1]);
    const limit = Math.max(2 * stepMs, 3 * (deltas.length ? median(deltas) : stepMs));
    const x = [];
    const ys = columns.map(() => []);
    for (let i = 0; i < times.length; i++) {
      if (i > 0 && times[i] - times[i - 1] > limit) {
        x.push((times[i - 1] + stepMs) / 1000);
        ys.forEach((y) => y.push(null));
      }
      x.push(times[i] / 1000);
      columns.forEach((c, j) => ys[j].push(c[i]));
    }
    return [x, ...ys];
  }

  // ------------------------------------------------------------------ one chart

  /** The last row of uPlot data where any series has a value. */
  function lastIndex(data) {
    for (let i = data[0].length - 1; i >= 0; i--) {
      for (let j = 1; j < data.length; j++) if (data[j][i] != null) return i;
    }
    return null;
  }

  /**
   * A uPlot chart in `el` that keeps its shape across loads: made again only when the series
   * change, otherwise given new data (keeping the user's zoom while it refreshes).
   */
  class Chart {
    constructor(el) {
      this.el = el;
      this.u = null;
      this.shape = "";
      this.range = [0, 1];
      this.message = null;
      this.observer = null;
    }

    height() {
      return this.el.classList.contains("short") ? 140 : 220;
    }

    draw(shape, opts, data, range) {
      const full = this.u && Math.abs(this.u.scales.x.min - this.range[0]) < 1 && Math.abs(this.u.scales.x.max - this.range[1]) < 1;
      const zoomed = this.u && !full && this.sameSpan(range);
      this.range = range;
      if (this.u && this.shape === shape) {
        this.u.setData(data, !zoomed);
      } else {
        if (this.u) this.u.destroy();
        this.shape = shape;
        const self = this;
        const options = Object.assign(
          {
            width: Math.max(240, this.el.clientWidth),
            height: this.height(),
            cursor: { drag: { x: true, y: false } },
            legend: { live: true },
            // Ticks fall on whole UTC hours and days, as the labels read.
            tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
          },
          opts,
        );
        options.scales = Object.assign({}, opts.scales, {
          x: { time: true, range: () => [self.range[0], self.range[1]] },
        });
        // Away from the cursor the legend shows the latest values rather than dashes.
        options.hooks = {
          setLegend: [
            (u) => {
              const last = lastIndex(u.data);
              if (u.legend.idx == null && last != null) u.setLegend({ idx: last });
            },
          ],
        };
        this.u = new uPlot(options, data, this.el);
        this.el._uplot = this.u;
        if (!this.observer && "ResizeObserver" in window) {
          let last = this.el.clientWidth;
          this.observer = new ResizeObserver(() => {
            const w = this.el.clientWidth;
            if (this.u && w > 0 && Math.abs(w - last) > 2) {
              last = w;
              this.u.setSize({ width: Math.max(240, w), height: this.height() });
            }
          });
          this.observer.observe(this.el);
        }
      }
      this.rest();
    }

    rest() {
      const last = lastIndex(this.u.data);
      if (last != null && this.u.cursor.left < 0) this.u.setLegend({ idx: last });
    }

    sameSpan(range) {
      return Math.abs(range[1] - range[0] - (this.range[1] - this.range[0])) < 2;
    }

    say(text, cls) {
      if (!this.message) {
        this.message = document.createElement("p");
        this.el.appendChild(this.message);
      }
      this.message.className = `chart-message ${cls || ""}`;
      this.message.textContent = text;
      this.message.hidden = !text;
      if (cls === "error") this.message.setAttribute("role", "alert");
      else this.message.removeAttribute("role");
    }
  }

  const timeSeries = { value: (u, v) => (v == null ? "—" : localTime(v * 1000)) };

  function valueAxis(unit, formatter) {
    const f = formatter || ((v) => fmt(v, unit));
    // Rounded labels of close ticks can repeat ("1.5", "1.5"): a repeated label is left blank.
    const axis = {
      size: 70,
      values: (u, splits) => {
        const labels = splits.map(f);
        return labels.map((l, i) => (i > 0 && l === labels[i - 1] ? "" : l));
      },
    };
    if (unit === "B" || unit === "B/s") axis.incrs = BYTE_INCRS;
    return axis;
  }

  function stat(name, text) {
    const span = document.createElement("span");
    span.append(`${name} `);
    const b = document.createElement("b");
    b.dataset.stat = name;
    b.textContent = text;
    span.appendChild(b);
    return span;
  }

  function showStats(p, pairs) {
    if (!p) return;
    p.replaceChildren(...pairs.map(([n, t]) => stat(n, t)));
  }

  function errorText(what, e) {
    return e instanceof ApiError ? `${what}: ${e.message}` : `${what}: ${e && e.message ? e.message : e}`;
  }

  // ------------------------------------------------------------------ a device's metrics

  class DeviceMetrics {
    constructor(root) {
      this.root = root;
      this.device = root.dataset.device;
      this.grid = root.querySelector("#device-charts");
      this.cards = new Map();
      for (const fig of this.grid.querySelectorAll(".chart-card[data-metric]")) this.adopt(fig);
    }

    adopt(fig) {
      const metric = fig.dataset.metric;
      const counter = isCounter(metric);
      const base = unitOf(metric);
      const unit = counter ? (base === "B" ? "B/s" : "/s") : base;
      const card = { metric, fig, unit, counter, chart: new Chart(fig.querySelector(".chart")), loads: 0 };
      const cap = fig.querySelector("figcaption");
      if (card.unit && !cap.querySelector(".chart-unit")) {
        const u = document.createElement("span");
        u.className = "chart-unit";
        const names = { B: "bytes", "B/s": "bytes per second", "/s": "per second" };
        u.textContent = names[card.unit] || card.unit;
        cap.querySelector(".chart-title").after(" ", u);
      }
      this.cards.set(metric, card);
      return card;
    }

    card(metric) {
      if (this.cards.has(metric)) return this.cards.get(metric);
      const fig = document.createElement("figure");
      fig.className = "chart-card";
      fig.dataset.metric = metric;
      fig.id = `metric-${metric}`;
      const cap = document.createElement("figcaption");
      const title = document.createElement("span");
      title.className = "chart-title";
      title.textContent = metric;
      const last = document.createElement("span");
      last.className = "chart-last muted";
      cap.append(title, " ", last);
      const el = document.createElement("div");
      el.className = "chart";
      el.setAttribute("aria-label", metric);
      const stats = document.createElement("p");
      stats.className = "chart-stats";
      fig.append(cap, el, stats);
      // In the page's order: health first, the agent's own metrics last, by name within.
      const after = [...this.cards.keys()].filter((m) => byRank(m, metric) < 0).sort(byRank).pop();
      if (after) this.cards.get(after).fig.after(fig);
      else this.grid.prepend(fig);
      return this.adopt(fig);
    }

    async load(ctx) {
      let list;
      try {
        // The first page of 500 (by name); a device has at most [telemetry] max_series_per_device.
        list = (await getJson(`/api/v1/devices/${enc(this.device)}/metrics?limit=500`, ctx.signal)).items;
      } catch (e) {
        if (isAbort(e)) throw e;
        ctx.fail(errorText("The device's metrics could not be listed", e));
        return;
      }
      const none = document.getElementById("no-metrics");
      if (none) none.hidden = list.length > 0;
      for (const m of list) {
        const card = this.card(m.name);
        const last = card.fig.querySelector(".chart-last");
        if (last && m.last_t != null) {
          // A counter's latest value is its total; its chart shows the rate.
          const what = card.counter ? "total" : "latest";
          const unit = card.counter ? card.unit.replace("/s", "") : card.unit;
          last.textContent = `${what} ${fmt(m.last_value, unit)}, ${ago(m.last_t)}`;
        }
      }
      await Promise.all(list.map((m) => this.series(this.cards.get(m.name), ctx)));
      await this.events(ctx);
    }

    async series(card, ctx) {
      const url =
        `/api/v1/devices/${enc(this.device)}/metrics/${enc(card.metric)}` +
        `?from=${ctx.from}&to=${ctx.to}&step=${ctx.step}`;
      card.fig.dataset.state = "loading";
      let s;
      try {
        s = await getJson(url, ctx.signal);
      } catch (e) {
        if (isAbort(e)) throw e;
        card.fig.dataset.state = "error";
        card.chart.say(errorText(card.metric, e), "error");
        ctx.failed++;
        return;
      }
      const pts = card.counter ? rates(s.points) : s.points;
      // Min and max only say something when a bucket holds more than one value.
      const spread = pts.some((p) => p.count > 1);
      const cols = spread ? [pts.map((p) => p.avg), pts.map((p) => p.min), pts.map((p) => p.max)] : [pts.map((p) => p.avg)];
      const data = gapped(
        pts.map((p) => p.t),
        cols,
        s.step,
      );
      const f = (u, v) => fmt(v, card.unit);
      const series = [timeSeries, { label: spread ? "avg" : card.metric, stroke: ACCENT, width: 2, value: f }];
      const opts = { series, axes: [timeAxis(), valueAxis(card.unit)], scales: { y: { range: yRange(card.unit) } } };
      if (spread) {
        series.push({ label: "min", stroke: EDGE, width: 1, value: f }, { label: "max", stroke: EDGE, width: 1, value: f });
        opts.bands = [{ series: [3, 2], fill: BAND }];
      }
      card.chart.draw(`${spread}`, opts, data, [ctx.from / 1000, ctx.to / 1000]);
      card.chart.say(pts.length ? "" : "No data in this range.");
      card.loads++;
      Object.assign(card.fig.dataset, {
        state: pts.length ? "ok" : "empty",
        points: String(pts.length),
        resolution: s.resolution,
        step: String(s.step),
        loads: String(card.loads),
      });
      if (pts.length) {
        const n = pts.reduce((a, p) => a + p.count, 0);
        const avg = pts.reduce((a, p) => a + p.avg * p.count, 0) / n;
        showStats(card.fig.querySelector(".chart-stats"), [
          ["min", fmt(Math.min(...pts.map((p) => p.min)), card.unit)],
          ["avg", fmt(avg, card.unit)],
          ["max", fmt(Math.max(...pts.map((p) => p.max)), card.unit)],
          ["values", n.toLocaleString()],
        ]);
      } else {
        showStats(card.fig.querySelector(".chart-stats"), []);
      }
    }

    async events(ctx) {
      const table = document.getElementById("telemetry-events");
      if (!table) return;
      const tbody = table.tBodies[0];
      let list;
      try {
        list = await getJson(
          `/api/v1/devices/${enc(this.device)}/telemetry-events?from=${ctx.from}&to=${ctx.to}&limit=50`,
          ctx.signal,
        );
      } catch (e) {
        if (isAbort(e)) throw e;
        const row = tbody.insertRow(0);
        const cell = row.insertCell();
        cell.colSpan = 4;
        cell.className = "error";
        cell.setAttribute("role", "alert");
        cell.textContent = errorText("The telemetry events could not be loaded", e);
        ctx.failed++;
        return;
      }
      const rows = list.map((e) => {
        const tr = document.createElement("tr");
        const when = document.createElement("td");
        const time = document.createElement("time");
        time.dateTime = new Date(e.ts).toISOString();
        time.textContent = localTime(e.ts);
        when.appendChild(time);
        if (e.late) {
          const late = document.createElement("span");
          late.className = "muted";
          late.title = "Arrived late: the device was offline or its clock is off";
          late.textContent = "late";
          when.append(" ", late);
        }
        const name = document.createElement("td");
        name.textContent = e.name;
        const sev = document.createElement("td");
        const badge = document.createElement("span");
        badge.className = `severity severity-${e.severity}`;
        badge.textContent = e.severity;
        sev.appendChild(badge);
        const data = document.createElement("td");
        data.className = "mono";
        data.textContent = e.data;
        tr.append(when, name, sev, data);
        return tr;
      });
      if (!rows.length) {
        const tr = document.createElement("tr");
        const td = document.createElement("td");
        td.colSpan = 4;
        td.className = "muted";
        td.textContent = "No telemetry events in this range.";
        tr.appendChild(td);
        rows.push(tr);
      }
      tbody.replaceChildren(...rows);
      table.dataset.events = String(list.length);
    }
  }

  // ------------------------------------------------------------------ fleet aggregates

  function scopeQuery(panel) {
    if (panel.dataset.group) return `&group=${enc(panel.dataset.group)}`;
    if (panel.dataset.filter) return `&filter=${enc(panel.dataset.filter)}`;
    return "";
  }

  const quote = (s) => `"${String(s).replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`;

  /** `identity` of a device as the pages write it: `serial=SN-1, mac=…`. */
  function label(d) {
    return d.display_name || d.id;
  }

  class FleetPanel {
    constructor(root) {
      this.root = root;
      this.metric = root.dataset.metric || "";
      this.fleet = new Chart(root.querySelector("[data-chart=fleet] .chart"));
      this.devices = new Chart(root.querySelector("[data-chart=devices] .chart"));
      const split = root.querySelector("[data-chart=split] .chart");
      this.split = split ? new Chart(split) : null;
      this.by = root.querySelector(".top-by");
      this.n = root.querySelector(".top-n");
      this.loads = 0;
      this.labels = new Map();
    }

    setMetric(m) {
      this.metric = m;
      this.root.dataset.metric = m;
      for (const t of this.root.querySelectorAll("[data-chart=fleet] .chart-title, [data-chart=split] .chart-title")) {
        const rest = t.textContent.includes(" by tag ") ? t.textContent.slice(t.textContent.indexOf(" by tag ")) : "";
        t.textContent = m + rest;
      }
    }

    async load(ctx) {
      if (!this.metric) return;
      const unit = unitOf(this.metric);
      const q = `metric=${enc(this.metric)}&from=${ctx.from}&to=${ctx.to}`;
      const jobs = [this.aggregate(ctx, q, unit), this.top(ctx, q, unit)];
      if (this.split) jobs.push(this.splitChart(ctx, q, unit));
      await Promise.all(jobs);
      this.loads++;
      this.root.dataset.loads = String(this.loads);
    }

    async aggregate(ctx, q, unit) {
      const card = this.root.querySelector("[data-chart=fleet]");
      card.dataset.state = "loading";
      let s;
      try {
        s = await getJson(`/api/v1/metrics/fleet?${q}&step=${ctx.fleetStep}${scopeQuery(this.root)}`, ctx.signal);
      } catch (e) {
        if (isAbort(e)) throw e;
        card.dataset.state = "error";
        this.fleet.say(errorText(this.metric, e), "error");
        this.devices.say("");
        ctx.failed++;
        return;
      }
      const b = s.buckets;
      const data = gapped(
        b.map((x) => x.t),
        [b.map((x) => x.avg), b.map((x) => x.min), b.map((x) => x.max), b.map((x) => x.p50), b.map((x) => x.p95), b.map((x) => x.devices)],
        s.step,
      );
      const f = (u, v) => fmt(v, unit);
      const range = [ctx.from / 1000, ctx.to / 1000];
      this.fleet.draw(
        "fleet",
        {
          series: [
            timeSeries,
            { label: "avg", stroke: ACCENT, width: 2, value: f },
            { label: "min", stroke: EDGE, width: 1, value: f },
            { label: "max", stroke: EDGE, width: 1, value: f },
            { label: "p50", stroke: "#067647", width: 1.5, dash: [6, 4], value: f },
            { label: "p95", stroke: "#b54708", width: 1.5, dash: [6, 4], value: f },
          ],
          bands: [{ series: [3, 2], fill: BAND }],
          axes: [timeAxis(), valueAxis(unit)],
          scales: { y: { range: yRange(unit) } },
        },
        data.slice(0, 6),
        range,
      );
      const count = (u, v) => (v == null ? "—" : `${v}`);
      this.devices.draw(
        "devices",
        {
          series: [timeSeries, { label: "devices", stroke: "#475467", fill: "rgba(71, 84, 103, 0.10)", width: 1.5, value: count, paths: uPlot.paths.stepped({ align: 1 }) }],
          axes: [timeAxis(), valueAxis("", (v) => (Number.isInteger(v) ? String(v) : ""))],
          scales: { y: { range: yRange("devices") } },
        },
        [data[0], data[6]],
        range,
      );
      const empty = b.length ? "" : "No data in this range.";
      this.fleet.say(empty);
      this.devices.say(empty);
      Object.assign(card.dataset, {
        state: b.length ? "ok" : "empty",
        points: String(b.length),
        resolution: s.resolution,
        step: String(s.step),
      });
      const summary = this.root.querySelector(".fleet-devices");
      summary.replaceChildren();
      const n = document.createElement("span");
      n.className = "n";
      n.textContent = s.devices.toLocaleString();
      summary.append(n, ` device${s.devices === 1 ? "" : "s"} reported ${this.metric} in this range`);
      if (b.length) {
        showStats(card.querySelector(".chart-stats"), [
          ["min", fmt(Math.min(...b.map((x) => x.min)), unit)],
          ["avg", fmt(b.reduce((a, x) => a + x.avg, 0) / b.length, unit)],
          ["highest p95", fmt(Math.max(...b.map((x) => x.p95)), unit)],
          ["max", fmt(Math.max(...b.map((x) => x.max)), unit)],
        ]);
      } else {
        showStats(card.querySelector(".chart-stats"), []);
      }
    }

    async splitChart(ctx, q, unit) {
      const key = this.root.dataset.splitKey;
      const values = JSON.parse(this.root.dataset.splitValues || "[]");
      const base = this.root.dataset.filter;
      const card = this.root.querySelector("[data-chart=split]");
      let answers;
      try {
        answers = await Promise.all(
          values.map((v) => {
            const cond = `tag.${key} = ${quote(v)}`;
            const filter = base ? `(${base}) and ${cond}` : cond;
            return getJson(`/api/v1/metrics/fleet?${q}&step=${ctx.fleetStep}&filter=${enc(filter)}`, ctx.signal);
          }),
        );
      } catch (e) {
        if (isAbort(e)) throw e;
        card.dataset.state = "error";
        this.split.say(errorText(`${this.metric} by ${key}`, e), "error");
        ctx.failed++;
        return;
      }
      // One x axis for all values: the union of their buckets, a value without a bucket null.
      const times = [...new Set(answers.flatMap((a) => a.buckets.map((b) => b.t)))].sort((a, b) => a - b);
      const cols = answers.map((a) => {
        const byT = new Map(a.buckets.map((b) => [b.t, b.avg]));
        return times.map((t) => (byT.has(t) ? byT.get(t) : null));
      });
      const data = gapped(times, cols, answers[0].step);
      const f = (u, v) => fmt(v, unit);
      const series = [timeSeries].concat(
        values.map((v, i) => ({ label: `${key}=${v}`, stroke: PALETTE[i % PALETTE.length], width: 1.5, value: f, spanGaps: false })),
      );
      this.split.draw(
        `split:${values.join("\u0000")}`,
        { series, axes: [timeAxis(), valueAxis(unit)], scales: { y: { range: yRange(unit) } } },
        data,
        [ctx.from / 1000, ctx.to / 1000],
      );
      this.split.say(times.length ? "" : "No data in this range.");
      card.dataset.state = times.length ? "ok" : "empty";
    }

    async top(ctx, q, unit) {
      const table = this.root.querySelector(".top-devices");
      const tbody = table.tBodies[0];
      const by = this.by ? this.by.value : "avg";
      const n = this.n ? this.n.value : "10";
      const message = (text, cls) => {
        const tr = document.createElement("tr");
        const td = document.createElement("td");
        td.colSpan = 4;
        td.className = cls;
        if (cls === "error") td.setAttribute("role", "alert");
        td.textContent = text;
        tr.appendChild(td);
        tbody.replaceChildren(tr);
      };
      let rows;
      try {
        rows = await getJson(`/api/v1/metrics/top?${q}&by=${by}&n=${n}${scopeQuery(this.root)}`, ctx.signal);
        const missing = rows.map((r) => r.device_id).filter((id) => !this.labels.has(id));
        if (missing.length) {
          const filter = `id in (${missing.map(quote).join(", ")})`;
          const page = await getJson(`/api/v1/devices?limit=500&filter=${enc(filter)}`, ctx.signal);
          for (const d of page.items) this.labels.set(d.id, label(d));
        }
      } catch (e) {
        if (isAbort(e)) throw e;
        message(errorText("The top devices could not be loaded", e), "error");
        ctx.failed++;
        return;
      }
      if (!rows.length) {
        message("No device reported this metric in this range.", "muted");
        return;
      }
      tbody.replaceChildren(
        ...rows.map((r, i) => {
          const tr = document.createElement("tr");
          tr.dataset.device = r.device_id;
          const rank = document.createElement("td");
          rank.textContent = String(i + 1);
          const dev = document.createElement("td");
          const a = document.createElement("a");
          a.href = `/devices/${enc(r.device_id)}/metrics`;
          a.textContent = this.labels.get(r.device_id) || r.device_id;
          const id = document.createElement("span");
          id.className = "muted mono";
          id.textContent = r.device_id;
          dev.append(a, document.createElement("br"), id);
          const value = document.createElement("td");
          value.className = "num";
          value.textContent = fmt(r.value, unit);
          const count = document.createElement("td");
          count.className = "num";
          count.textContent = r.count.toLocaleString();
          tr.append(rank, dev, value, count);
          return tr;
        }),
      );
    }
  }

  // ------------------------------------------------------------------ a page of charts

  class Page {
    constructor(root) {
      this.root = root;
      this.parts = [];
      this.gen = 0;
      this.controller = null;
      this.timer = null;
      this.lastLoad = 0;
      this.picker = root.querySelector(".range-picker");
      this.status = root.querySelector(".charts-status");
      const wanted = new URLSearchParams(location.search).get("range");
      this.range = RANGES[wanted] ? wanted : this.picker && RANGES[this.picker.dataset.range] ? this.picker.dataset.range : "1h";
      if (this.picker) {
        this.picker.addEventListener("click", (e) => {
          const a = e.target.closest("[data-range]");
          if (!a || !RANGES[a.dataset.range]) return;
          e.preventDefault();
          this.setRange(a.dataset.range);
        });
      }
      document.addEventListener("visibilitychange", () => {
        if (!document.hidden && RANGES[this.range].refresh && Date.now() - this.lastLoad > REFRESH_MS) this.refresh();
      });
    }

    setRange(r) {
      this.range = r;
      const url = new URL(location.href);
      url.searchParams.set("range", r);
      history.replaceState(null, "", url);
      const hidden = document.querySelector("#metrics-form input[name=range]");
      if (hidden) hidden.value = r;
      this.refresh();
    }

    say(text, cls) {
      if (!this.status) return;
      this.status.textContent = text;
      this.status.className = `charts-status ${cls || "muted"}`;
    }

    async refresh() {
      const gen = ++this.gen;
      if (this.controller) this.controller.abort();
      this.controller = new AbortController();
      const r = RANGES[this.range];
      if (this.picker) {
        this.picker.dataset.range = this.range;
        for (const a of this.picker.querySelectorAll("[data-range]")) {
          a.setAttribute("aria-pressed", String(a.dataset.range === this.range));
        }
      }
      const to = Date.now();
      const ctx = { from: to - r.span, to, step: r.step, fleetStep: r.fleetStep, signal: this.controller.signal, failed: 0, fatal: null };
      ctx.fail = (text) => {
        ctx.fatal = text;
      };
      this.say("Loading…");
      const results = await Promise.allSettled(this.parts.map((p) => p.load(ctx)));
      if (gen !== this.gen) return;
      this.lastLoad = Date.now();
      const crashed = results.find((x) => x.status === "rejected" && !isAbort(x.reason));
      if (crashed) console.error(crashed.reason);
      const when = utc(Date.now());
      const again = r.refresh ? " · refreshes every 30 s" : "";
      if (ctx.fatal) this.say(ctx.fatal, "error");
      else if (crashed) this.say(`Updated ${when}, but drawing failed: ${crashed.reason}`, "error");
      else if (ctx.failed) this.say(`Updated ${when}: ${ctx.failed} part${ctx.failed === 1 ? "" : "s"} could not be loaded (see below)${again}`, "error");
      else this.say(`Updated ${when}${again}`);
      this.root.dataset.range = this.range;
      this.root.dataset.loaded = String(gen);
      this.schedule();
    }

    schedule() {
      clearTimeout(this.timer);
      if (!RANGES[this.range].refresh) return;
      this.timer = setTimeout(() => {
        if (document.hidden) this.schedule();
        else this.refresh();
      }, REFRESH_MS);
    }
  }

  // ------------------------------------------------------------------ the device page's list

  async function deviceSummary(el) {
    const device = el.dataset.device;
    const say = (text, cls) => {
      const p = document.createElement("p");
      p.className = cls;
      if (cls === "error") p.setAttribute("role", "alert");
      p.textContent = text;
      el.replaceChildren(p);
    };
    let list;
    try {
      list = (await getJson(`/api/v1/devices/${enc(device)}/metrics?limit=500`)).items;
    } catch (e) {
      say(errorText("The device's metrics could not be listed", e), "error");
      return;
    }
    if (!list.length) {
      say("The device has not reported metrics yet.", "muted");
      return;
    }
    const table = document.createElement("table");
    table.className = "list metric-summary";
    const head = table.createTHead().insertRow();
    for (const h of ["Metric", "Latest", "When"]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    const body = table.createTBody();
    // Health first, the agent's own metrics last, as on the charts page.
    for (const m of list.slice().sort((a, b) => byRank(a.name, b.name))) {
      const tr = body.insertRow();
      tr.dataset.metric = m.name;
      const name = tr.insertCell();
      const a = document.createElement("a");
      a.href = `/devices/${enc(device)}/metrics#metric-${enc(m.name)}`;
      a.textContent = m.name;
      a.className = "mono";
      name.appendChild(a);
      const v = tr.insertCell();
      v.className = "num";
      v.textContent = fmt(m.last_value, unitOf(m.name));
      const when = tr.insertCell();
      when.textContent = m.last_t == null ? "" : ago(m.last_t);
      if (m.last_t != null) when.title = localTime(m.last_t);
    }
    el.replaceChildren(table);
  }

  // ------------------------------------------------------------------ a group's chooser

  async function groupChooser(select, panel, page) {
    const empty = (text, cls) => {
      const p = document.createElement("p");
      p.className = cls;
      if (cls === "error") p.setAttribute("role", "alert");
      p.textContent = text;
      panel.root.hidden = true;
      if (page.picker) page.picker.parentElement.hidden = true;
      select.closest("form").replaceWith(p);
    };
    let names;
    try {
      names = (await getJson(`/ui/metrics/names?group=${enc(select.dataset.group)}`)).metrics;
    } catch (e) {
      empty(errorText("The group's metrics could not be listed", e), "error");
      return false;
    }
    if (!names.length) {
      empty("No device in this group has reported metrics yet.", "muted");
      return false;
    }
    const wanted = new URLSearchParams(location.search).get("metric");
    const chosen = names.includes(wanted) ? wanted : names.includes("cpu.percent") ? "cpu.percent" : names[0];
    select.replaceChildren(
      ...names.map((n) => {
        const o = document.createElement("option");
        o.value = n;
        o.textContent = n;
        o.selected = n === chosen;
        return o;
      }),
    );
    panel.setMetric(chosen);
    select.addEventListener("change", () => {
      panel.setMetric(select.value);
      const url = new URL(location.href);
      url.searchParams.set("metric", select.value);
      history.replaceState(null, "", url);
      page.refresh();
    });
    return true;
  }

  // ------------------------------------------------------------------ start

  async function start() {
    for (const el of document.querySelectorAll("#device-metrics-summary[data-device]")) deviceSummary(el);
    for (const root of document.querySelectorAll(".charts[data-page]")) {
      if (typeof uPlot === "undefined") {
        root.prepend(Object.assign(document.createElement("p"), { className: "error", textContent: "The chart library did not load." }));
        continue;
      }
      const page = new Page(root);
      if (root.dataset.page === "device") page.parts.push(new DeviceMetrics(root));
      const panelEl = root.querySelector(".fleet-panel");
      if (panelEl) {
        const panel = new FleetPanel(panelEl);
        page.parts.push(panel);
        for (const sel of [panel.by, panel.n]) if (sel) sel.addEventListener("change", () => page.refresh());
        const chooser = root.querySelector("select.metric-choice[data-group]");
        if (chooser && !(await groupChooser(chooser, panel, page))) continue;
        panelEl.querySelector(".top-options").addEventListener("submit", (e) => e.preventDefault());
      }
      const metricChoice = document.getElementById("metric-choice");
      if (metricChoice) metricChoice.addEventListener("change", () => metricChoice.form.requestSubmit());
      page.refresh();
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
