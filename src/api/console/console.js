// fhir-cdc console: reads /console/api/* and draws it. Read-only. Every value is set as
// text (never as HTML), so nothing the daemon reports can run here. The bearer token lives
// in this tab's sessionStorage only; a `#token=...` fragment is taken once and removed from
// the address bar (fragments are never sent to a server).
'use strict';
(function () {
  const KEY = 'fhir-cdc-console-token';
  const REFRESH_MS = 10000;
  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';
  let selected = null;
  let timer = null;

  function takeFragmentToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (m) {
      sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
      history.replaceState(null, '', location.pathname + location.search);
    }
  }

  class Refused extends Error {}

  async function get(path) {
    const headers = { Accept: 'application/json' };
    const token = sessionStorage.getItem(KEY);
    if (token) headers.Authorization = 'Bearer ' + token;
    const r = await fetch(path, { headers, cache: 'no-store' });
    if (r.status === 401 || r.status === 403) {
      throw new Refused(token ? 'The token was refused (' + r.status + ').' : '');
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || ('HTTP ' + r.status));
    return body;
  }

  function showLogin(message) {
    $('main').hidden = true;
    clear($('main'));
    $('verdict').textContent = '';
    $('forget').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    document.body.dataset.state = 'login';
  }

  // Removes every row and drawing under `el` (used when the token goes).
  function clear(el) {
    el.querySelectorAll('tbody, svg, ul').forEach((n) => n.replaceChildren());
  }

  function cell(tr, text, cls) {
    const td = document.createElement('td');
    td.textContent = text === null || text === undefined ? '-' : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function when(iso) {
    if (!iso) return '-';
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return '-';
    if (seconds < 120) return seconds.toFixed(0) + ' s';
    if (seconds < 7200) return (seconds / 60).toFixed(0) + ' min';
    return (seconds / 3600).toFixed(1) + ' h';
  }

  function bytes(n) {
    if (n < 1024) return n + ' B';
    if (n < 1048576) return (n / 1024).toFixed(1) + ' KiB';
    if (n < 1073741824) return (n / 1048576).toFixed(1) + ' MiB';
    return (n / 1073741824).toFixed(2) + ' GiB';
  }

  function renderSlot(r) {
    const body = $('slot').tBodies[0];
    body.replaceChildren();
    const s = r.slot, c = r.capture, h = c.lock_holder;
    const rows = [
      ['slot', s.name + (s.exists ? '' : ' (does not exist)')],
      ['read by capture', s.active ? 'yes' : 'NO'],
      ['wal_status', s.wal_status || '-'],
      ['lag', bytes(s.lag_bytes) + ', ' + age(s.lag_seconds) + ' (' + s.level + ')'],
      ['retained WAL', bytes(s.retained_bytes)],
      ['capture lock holder', h ? 'pid ' + h.pid + ' ' + (h.application_name || '') + ' ' + (h.client_addr || 'local') : 'none'],
      ['last commit queued', (c.checkpoint_lsn || '-') + ' at ' + when(c.checkpoint_at)],
      ['dead letters', r.dead_letters],
      ['capture gaps', r.capture_gaps],
    ];
    for (const [k, v] of rows) {
      const tr = document.createElement('tr');
      const th = document.createElement('th');
      th.textContent = k;
      tr.appendChild(th);
      cell(tr, v);
      body.appendChild(tr);
    }
  }

  function renderTopics(r) {
    const body = $('topics').tBodies[0];
    body.replaceChildren();
    for (const t of r.topics) {
      const tr = document.createElement('tr');
      cell(tr, t.url);
      cell(tr, t.events_behind);
      body.appendChild(tr);
    }
  }

  function renderSubscriptions(r) {
    const body = $('subscriptions').tBodies[0];
    body.replaceChildren();
    for (const s of r.subscriptions) {
      const tr = document.createElement('tr');
      tr.className = 'selectable' + (s.id === selected ? ' selected' : '');
      tr.dataset.id = s.id;
      tr.dataset.status = s.status;
      cell(tr, s.id);
      cell(tr, s.status, 'status-' + s.status);
      cell(tr, s.channel);
      cell(tr, s.endpoint_host || '-');
      cell(tr, s.pending);
      cell(tr, age(s.oldest_pending_age_seconds));
      cell(tr, s.failures);
      cell(tr, when(s.next_attempt_at));
      cell(tr, s.last_error, s.last_error ? 'error last-error' : 'last-error');
      tr.addEventListener('click', () => { selected = s.id; load(); });
      body.appendChild(tr);
    }
  }

  function svgEl(name, attrs, parent) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    parent.appendChild(el);
    return el;
  }

  // The smallest 4 x (1, 2 or 5 x 10^k) at or above `v`, so the 4 grid lines have round values.
  function niceTop(v) {
    const raw = v / 4;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((f) => f * p).find((st) => st >= raw);
    return Math.max(4, step * 4);
  }

  // A line per series over the last 60 minutes, ending at `now`.
  function chart(svg, minutes, series, now, format) {
    svg.replaceChildren();
    const W = 600, H = 180, L = 56, R = 10, T = 12, B = 24;
    const end = Math.floor(now / 60000) * 60000;
    const start = end - 59 * 60000;
    const x = (t) => L + ((t - start) / (59 * 60000)) * (W - L - R);
    let top = 1;
    for (const m of minutes) for (const s of series) top = Math.max(top, m[s.key]);
    const max = niceTop(top);
    const y = (v) => H - B - (v / max) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      svgEl('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }, svg);
      svgEl('text', { x: L - 4, y: y(v) + 4, 'text-anchor': 'end' }, svg).textContent = format(Math.round(v));
    }
    svgEl('line', { x1: L, x2: L, y1: T, y2: H - B, class: 'axis' }, svg);
    svgEl('line', { x1: L, x2: W - R, y1: H - B, y2: H - B, class: 'axis' }, svg);
    svgEl('text', { x: L, y: H - 6 }, svg).textContent = '-60 min';
    svgEl('text', { x: W - R, y: H - 6, 'text-anchor': 'end' }, svg).textContent = 'now';
    for (const s of series) {
      const pts = minutes
        .filter((m) => Date.parse(m.at) >= start)
        .map((m) => [x(Date.parse(m.at)), y(m[s.key])]);
      const line = svgEl('polyline', {
        class: 'series ' + s.key,
        'data-series': s.key,
        'data-points': pts.length,
        'data-max': minutes.reduce((a, m) => Math.max(a, m[s.key]), 0),
        points: pts.map((p) => p[0].toFixed(1) + ',' + p[1].toFixed(1)).join(' '),
      }, svg);
      svgEl('title', {}, line).textContent = s.label;
      for (const p of pts) svgEl('circle', { cx: p[0].toFixed(1), cy: p[1].toFixed(1), r: 2.5, class: s.key }, svg);
    }
  }

  function renderHistory(data) {
    const now = Date.parse(data.generated_at) || Date.now();
    const minutes = data.history.map((m) => ({
      at: m.at, queued: m.events_queued, sent: m.notifications_sent, lag: m.slot_lag_bytes,
    }));
    chart($('chart-rates'), minutes, [
      { key: 'queued', label: 'events queued per minute' },
      { key: 'sent', label: 'notifications sent per minute' },
    ], now, String);
    chart($('chart-lag'), minutes, [{ key: 'lag', label: 'slot lag in bytes' }], now, bytes);
    $('history-note').textContent = minutes.length
      ? '(sampled every ' + data.sample_every_seconds + ' s since this instance started)'
      : '(no sample yet)';
  }

  async function renderAttempts(id) {
    const data = await get('console/api/attempts/' + encodeURIComponent(id));
    $('detail').hidden = false;
    $('detail-id').textContent = id;
    const body = $('attempts').tBodies[0];
    body.replaceChildren();
    for (const a of data.attempts) {
      const tr = document.createElement('tr');
      tr.dataset.ok = a.ok;
      cell(tr, when(a.at));
      cell(tr, a.kind);
      cell(tr, a.first_event === null ? '-' : a.first_event === a.last_event ? a.first_event : a.first_event + '-' + a.last_event);
      cell(tr, a.ok ? 'accepted' : 'failed', a.ok ? 'status-active' : 'status-error');
      cell(tr, a.status_code, 'status-code');
      cell(tr, a.duration_ms.toFixed(1) + ' ms');
      cell(tr, a.error);
      body.appendChild(tr);
    }
    if (!data.attempts.length) {
      const tr = document.createElement('tr');
      cell(tr, 'no attempt by this instance yet').colSpan = 7;
      body.appendChild(tr);
    }
  }

  async function load() {
    clearTimeout(timer);
    try {
      const data = await get('console/api/state');
      const r = data.report;
      $('login').hidden = true;
      $('unavailable').hidden = true;
      $('main').hidden = false;
      $('forget').hidden = !sessionStorage.getItem(KEY);
      const v = $('verdict');
      v.textContent = r.healthy ? 'healthy' : 'DEGRADED';
      v.className = 'verdict ' + (r.healthy ? 'healthy' : 'degraded');
      $('updated').textContent = 'as of ' + when(data.generated_at);
      const ul = $('problems');
      ul.replaceChildren();
      for (const p of r.problems) {
        const li = document.createElement('li');
        li.textContent = p;
        ul.appendChild(li);
      }
      if (!selected || !r.subscriptions.some((s) => s.id === selected)) {
        const failing = r.subscriptions.find((s) => s.status === 'error');
        selected = failing ? failing.id : (r.subscriptions[0] || {}).id || null;
      }
      renderSlot(r);
      renderTopics(r);
      renderSubscriptions(r);
      renderHistory(data);
      if (selected) await renderAttempts(selected);
      document.body.dataset.state = 'loaded';
    } catch (e) {
      if (e instanceof Refused) {
        showLogin(e.message);
        return;
      }
      const u = $('unavailable');
      u.textContent = 'Cannot read the state: ' + e.message;
      u.hidden = false;
      document.body.dataset.state = 'unavailable';
    }
    timer = setTimeout(load, REFRESH_MS);
  }

  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim();
    $('token').value = '';
    if (t) sessionStorage.setItem(KEY, t);
    load();
  });
  $('forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    showLogin('');
  });

  takeFragmentToken();
  load();
})();
