// connectord web console: plain JavaScript, no library, no inline code (the page's
// Content-Security-Policy allows only this origin's script). Every data call goes to the
// REST API with the access key, which is kept in sessionStorage only. Data from the daemon
// is put in the page as text (textContent), never as HTML.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const STORE = 'connectord.key';
  // Set while this session's WebSocket channel is one it made (removed at log-out).
  const MADE = 'connectord.ws-made';
  const FEED_MAX = 200; // live events kept on screen
  const POINTS_MAX = 300; // points kept per observed resource
  const ASYNC_WAIT_MS = 120000; // longer than the daemon's own 504 for a silent device

  let key = sessionStorage.getItem(STORE);
  let objects = {}; // LwM2M object definitions (objects.json)
  const endpoints = new Map(); // name -> {name, type, q, status}
  let current = null; // endpoint shown in the tree
  const pending = new Map(); // async-response id -> callback
  const early = new Map(); // async responses that arrived before their 202 was read
  const observed = new Map(); // "ep path" -> {ep, path, points: [{t, v}]}
  let plotted = null; // key of `observed` shown in the plot
  let feed = null; // the running event feed ({stop})

  // ---- helpers ----------------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of kids) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const enc = encodeURIComponent;
  // A device's resource path, segment by segment: each one encoded, so that no segment of
  // the device's choosing (`..`, `%2e%2e`, `?`) can turn the request into another route
  // (the daemon also refuses such links at registration).
  // A dot segment cannot be sent as such (browsers resolve `..` and `%2e%2e` alike): no
  // request is made for one.
  const encPath = (path) => path.split('/').map((seg) => {
    if (/^(\.|%2e){1,2}$/i.test(seg)) throw new Error(`a "." or ".." segment in ${path}`);
    return enc(seg);
  }).join('/');
  const resUrl = (ep, path) => `/v2/endpoints/${enc(ep)}${encPath(path)}`;
  const subUrl = (ep, path) => `/v2/subscriptions/${enc(ep)}${encPath(path)}`;

  function showError(msg) {
    $('error').textContent = msg || '';
    $('error').hidden = !msg;
  }

  class ApiError extends Error {
    constructor(status, type, message) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  const MEANING = {
    400: 'bad request', 401: 'key refused', 403: 'not allowed for this key', 404: 'not found',
    406: 'not acceptable', 409: 'conflict', 410: 'endpoint not registered', 412: 'bad value',
    413: 'too large', 415: 'unsupported type', 429: 'too many requests', 502: 'bad answer from the device',
    503: 'unavailable now', 504: 'the device did not answer',
  };
  const explain = (status, msg) => `${status} ${MEANING[status] || ''}${msg ? ': ' + msg : ''}`;

  // One REST call; a non-2xx answer throws an ApiError with the daemon's JSON message.
  async function api(method, path, opts = {}) {
    const headers = { Authorization: 'Bearer ' + key };
    if (opts.type) headers['Content-Type'] = opts.type;
    if (opts.accept) headers.Accept = opts.accept;
    let r;
    try {
      r = await fetch(path, { method, headers, body: opts.body, cache: 'no-store', signal: opts.signal });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, 'network', 'the daemon cannot be reached (' + e.message + ')');
    }
    const text = await r.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    if (!r.ok) {
      const msg = (json && json.message) || text;
      if (r.status === 401) logout('The access key was refused (401): ' + msg);
      throw new ApiError(r.status, (json && json.type) || 'http', explain(r.status, msg));
    }
    return { status: r.status, json };
  }

  // ---- values -----------------------------------------------------------------------
  // An own property only: a device's path segment such as `constructor` or `__proto__`
  // names no definition (not Object.prototype's).
  const own = (obj, k) => (obj && Object.prototype.hasOwnProperty.call(obj, k) ? obj[k] : undefined);
  function definition(path) {
    const [oid, , rid] = path.split('/').slice(1);
    const o = own(objects, oid);
    const r = o && rid !== undefined ? own(o.resources, rid) : null;
    return { object: o, resource: r ? { name: r[0], ops: r[1], type: r[2], multiple: r[3], units: r[4] } : null };
  }
  const typeOf = (oid, rid) => { const o = own(objects, oid); const r = o && own(o.resources, rid); return r ? r[2] : ''; };

  function bytesOf(b64) {
    const bin = atob(b64 || '');
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const utf8 = new TextDecoder('utf-8');

  // OMA-TLV (LwM2M 1.0 TS 6.4.3): entries of a payload.
  function tlvEntries(b) {
    const out = [];
    let i = 0;
    while (i < b.length) {
      const t = b[i++];
      let id = b[i++];
      if (t & 0x20) id = (id << 8) | b[i++];
      let len = t & 7;
      const lenBytes = (t >> 3) & 3;
      if (lenBytes) { len = 0; for (let k = 0; k < lenBytes; k++) len = len * 256 + b[i++]; }
      if (i + len > b.length || Number.isNaN(id)) throw new Error('malformed TLV');
      out.push({ kind: t >> 6, id, v: b.subarray(i, i + len) });
      i += len;
    }
    return out;
  }
  function tlvValue(v, type) {
    const dv = new DataView(v.buffer, v.byteOffset, v.byteLength);
    switch (type) {
      case 'Integer': case 'Unsigned Integer': case 'Time':
        if (v.length === 1) return dv.getInt8(0);
        if (v.length === 2) return dv.getInt16(0);
        if (v.length === 4) return dv.getInt32(0);
        if (v.length === 8) return Number(dv.getBigInt64(0));
        break;
      case 'Float':
        if (v.length === 4) return dv.getFloat32(0);
        if (v.length === 8) return dv.getFloat64(0);
        break;
      case 'Boolean': return v.length === 1 ? v[0] !== 0 : null;
      case 'Objlnk': if (v.length === 4) return `${dv.getUint16(0)}:${dv.getUint16(2)}`; break;
      case 'Opaque': return { base64: btoa(String.fromCharCode(...v)) };
      default: return utf8.decode(v);
    }
    return { base64: btoa(String.fromCharCode(...v)) };
  }
  function tlvTree(b, oid) {
    const out = {};
    for (const e of tlvEntries(b)) {
      if (e.kind === 0) out[e.id] = tlvTree(e.v, oid);
      else if (e.kind === 2) {
        const m = {};
        for (const ri of tlvEntries(e.v)) m[ri.id] = tlvValue(ri.v, typeOf(oid, e.id));
        out[e.id] = m;
      } else out[e.id] = tlvValue(e.v, typeOf(oid, e.id));
    }
    return out;
  }
  function senml(records, path) {
    const out = {};
    let base = '';
    for (const r of records) {
      if (r.bn !== undefined) base = r.bn;
      const v = r.v ?? r.vs ?? r.vb ?? (r.vd !== undefined ? { base64: r.vd } : r.vlo);
      out[base + (r.n || '')] = v;
    }
    const names = Object.keys(out);
    return names.length === 1 && (names[0] === path || names[0] === '') ? out[names[0]] : out;
  }

  // A payload (base64) in content type `ct` as a value or value tree. Reads ask the daemon
  // for JSON (it decodes every LwM2M format); notifications come as the device sent them.
  function decode(ct, b64, path) {
    const media = (ct || '').split(';')[0].trim().toLowerCase();
    const b = bytesOf(b64);
    const segs = path.split('/').slice(1);
    if (media === 'application/json') return JSON.parse(utf8.decode(b));
    if (media === 'application/senml+json') return senml(JSON.parse(utf8.decode(b)), path);
    if (media === 'application/vnd.oma.lwm2m+tlv') {
      const tree = tlvTree(b, segs[0]);
      if (segs.length === 3 && tree[segs[2]] !== undefined) return tree[segs[2]];
      if (segs.length === 2 && tree[segs[1]] !== undefined) return tree[segs[1]];
      return tree;
    }
    if (media === '' || media.startsWith('text/')) {
      const text = utf8.decode(b);
      const type = segs.length >= 3 ? typeOf(segs[0], segs[2]) : '';
      if (['Float', 'Integer', 'Unsigned Integer', 'Time'].includes(type) && text.trim() !== '' && Number.isFinite(Number(text))) return Number(text);
      if (type === 'Boolean' && (text === '0' || text === '1')) return text === '1';
      return text;
    }
    return { base64: b64, ct: media };
  }
  const show = (v) => (v !== null && typeof v === 'object' ? JSON.stringify(v) : String(v));

  // ---- async responses --------------------------------------------------------------
  function awaitAsync(id) {
    return new Promise((resolve) => {
      if (early.has(id)) { const r = early.get(id); early.delete(id); resolve(r); return; }
      const timer = setTimeout(() => { pending.delete(id); resolve({ status: 0, error: 'no answer on the event channel' }); }, ASYNC_WAIT_MS);
      pending.set(id, (r) => { clearTimeout(timer); resolve(r); });
    });
  }
  function settle(r) {
    const cb = pending.get(r.id);
    if (cb) { pending.delete(r.id); cb(r); return; }
    early.set(r.id, r);
    if (early.size > 100) early.delete(early.keys().next().value);
  }
  // The outcome of an async response: {value} or {error}.
  function outcome(r, path) {
    if (r.status >= 200 && r.status < 300) {
      if (!r.payload) return { value: '' };
      try { return { value: decode(r.ct, r.payload, path) }; } catch (e) { return { error: 'cannot decode: ' + e.message }; }
    }
    if (r.status === 0) return { error: r.error };
    return { error: explain(r.status, r.error) };
  }

  // ---- endpoints --------------------------------------------------------------------
  // The list shows at most LIST_MAX endpoints (by name, of those the search matches), and
  // how many more there are: a fleet of thousands in the page would make it crawl, and
  // the search finds any of them.
  const LIST_MAX = 500;
  let listTimer = null;

  // Renders the list again soon: once for a burst of registration events.
  function endpointsChanged() {
    if (listTimer !== null) return;
    listTimer = setTimeout(() => { listTimer = null; if (key) renderEndpoints(); }, 250);
  }

  function renderEndpoints() {
    const q = $('search').value.trim().toLowerCase();
    const list = $('ep-list');
    list.textContent = '';
    const all = [...endpoints.values()].sort((a, b) => a.name.localeCompare(b.name));
    const matching = all.filter((e) => !q || e.name.toLowerCase().includes(q) || (e.type || '').toLowerCase().includes(q));
    const shown = matching.slice(0, LIST_MAX);
    // The selected endpoint stays in the list, wherever it sorts.
    const sel = current !== null && !shown.some((e) => e.name === current) && matching.find((e) => e.name === current);
    if (sel) shown.push(sel);
    for (const e of shown) {
      list.append(el('li', {
        'data-ep': e.name, 'data-status': e.status, class: e.name === current ? 'sel' : '',
        title: e.type ? 'type ' + e.type : '', onclick: () => openEndpoint(e.name),
      }, el('span', {}, e.name), el('span', { class: 'badge ' + e.status }, e.status + (e.q ? ' (queue)' : ''))));
    }
    const hidden = matching.length - shown.length;
    if (hidden > 0) {
      list.append(el('li', { class: 'more', 'data-more': String(hidden) }, `… and ${hidden} more: search to narrow the list`));
    }
    const live = all.filter((e) => e.status === 'registered').length;
    $('ep-count').textContent = `${live} registered` + (shown.length !== all.length ? `, ${shown.length} shown` : '');
  }

  async function openEndpoint(name) {
    current = name;
    renderEndpoints();
    $('dev-title').textContent = name;
    const tree = $('tree');
    tree.textContent = 'Loading…';
    try {
      const r = await api('GET', `/v2/endpoints/${enc(name)}`);
      if (current === name) renderTree(name, r.json || []);
    } catch (e) {
      if (current === name) { tree.textContent = ''; tree.append(el('p', { class: 'err' }, e.message)); }
    }
  }

  // The resources a device listed, grouped as objects > instances > resources, named from
  // the OMA definitions. An instance listed without its resources shows the defined ones.
  function renderTree(ep, resources) {
    const groups = new Map(); // oid -> Map(iid -> Map(rid -> {path, obs}))
    const other = [];
    for (const r of resources) {
      const segs = r.uri.split('/').slice(1);
      if (r.uri === '/') continue;
      if (!segs.every((s) => /^\d+$/.test(s)) || segs.length === 0 || segs.length > 3) { other.push(r); continue; }
      const [oid, iid, rid] = segs;
      if (!groups.has(oid)) groups.set(oid, new Map());
      if (iid === undefined) continue;
      const inst = groups.get(oid);
      if (!inst.has(iid)) inst.set(iid, new Map());
      if (rid !== undefined) inst.get(iid).set(rid, { path: r.uri, obs: r.obs === true || r.obs === 'true' });
    }
    const tree = $('tree');
    tree.textContent = '';
    for (const oid of [...groups.keys()].sort((a, b) => a - b)) {
      const def = own(objects, oid);
      const obj = el('details', { open: '', 'data-object': oid },
        el('summary', {}, `${def ? def.name : 'Object'} `, el('span', { class: 'muted' }, '/' + oid)));
      for (const [iid, listed] of [...groups.get(oid)].sort((a, b) => a[0] - b[0])) {
        const ipath = `/${oid}/${iid}`;
        const rows = new Map(listed);
        if (rows.size === 0 && def) for (const rid of Object.keys(def.resources)) rows.set(rid, { path: `${ipath}/${rid}`, obs: false, defined: true });
        const table = el('table', {});
        for (const [rid, r] of [...rows].sort((a, b) => a[0] - b[0])) table.append(resourceRow(ep, r));
        const readAll = el('button', { type: 'button', onclick: () => readInstance(ep, ipath, table) }, 'Read instance');
        obj.append(el('details', { open: '', 'data-instance': ipath },
          el('summary', {}, `Instance ${iid} `, readAll), table));
      }
      tree.append(obj);
    }
    if (other.length) {
      const table = el('table', {});
      for (const r of other) table.append(resourceRow(ep, { path: r.uri, obs: r.obs === true || r.obs === 'true' }));
      tree.append(el('details', { open: '' }, el('summary', {}, 'Other resources'), table));
    }
    if (!tree.childElementCount) tree.append(el('p', { class: 'muted' }, 'This endpoint lists no resources this key may see.'));
  }

  function resourceRow(ep, r) {
    const d = definition(r.path).resource;
    const ops = d ? d.ops : 'RWE';
    const value = el('td', { class: 'value', 'data-value': r.path });
    const buttons = el('td', { class: 'ops' });
    const button = (label, op, fn) => el('button', { type: 'button', 'data-op': op, onclick: (ev) => fn(ev.target) }, label);
    if (ops.includes('R')) buttons.append(button('Read', 'read', () => read(ep, r.path, value)));
    if (ops.includes('W')) buttons.append(button('Write', 'write', () => writeForm(ep, r.path, value)));
    if (ops.includes('E')) buttons.append(button('Execute', 'execute', () => execute(ep, r.path, value)));
    if (ops.includes('R')) {
      const key = ep + ' ' + r.path;
      buttons.append(button(observed.has(key) ? 'Stop' : 'Observe', 'observe', (b) => observe(ep, r.path, value, b)));
    }
    if (!ops) buttons.append(el('span', { class: 'muted', title: 'no LwM2M server may access it' }, 'no access'));
    const type = d ? [d.type, d.units].filter(Boolean).join(' ') : '';
    return el('tr', { 'data-path': r.path },
      el('td', {}, d ? d.name : 'Resource', r.defined ? el('span', { class: 'muted', title: 'defined by the object, not listed by the device' }, ' *') : null),
      el('td', { class: 'path' }, r.path), el('td', { class: 'type' }, type), buttons, value);
  }

  function showValue(cell, o, path) {
    cell.classList.toggle('err', o.error !== undefined);
    if (o.error !== undefined) { cell.textContent = o.error; return; }
    const d = definition(path).resource;
    cell.textContent = show(o.value) + (d && d.units && typeof o.value === 'number' ? ' ' + d.units : '');
  }

  // A request whose answer comes as an async response: shown in `cell` once it arrives.
  async function request(method, ep, path, cell, opts) {
    cell.classList.remove('err');
    cell.textContent = '…';
    try {
      const r = await api(method, resUrl(ep, path), opts);
      if (r.status === 202 && r.json && r.json['async-response-id']) {
        const o = outcome(await awaitAsync(r.json['async-response-id']), path);
        return o;
      }
      return { value: r.json === null ? '' : r.json };
    } catch (e) {
      return { error: e.message };
    }
  }

  async function read(ep, path, cell) {
    showValue(cell, await request('GET', ep, path, cell, { accept: 'application/json' }), path);
  }

  async function readInstance(ep, ipath, table) {
    const first = table.querySelector('td.value');
    if (!first) return;
    const o = await request('GET', ep, ipath, first, { accept: 'application/json' });
    first.textContent = '';
    for (const cell of table.querySelectorAll('td.value')) {
      const rid = cell.dataset.value.split('/')[3];
      if (o.error !== undefined) { showValue(cell, o, cell.dataset.value); break; }
      if (o.value && o.value[rid] !== undefined) showValue(cell, { value: o.value[rid] }, cell.dataset.value);
    }
  }

  function writeForm(ep, path, cell) {
    const input = el('input', { 'aria-label': 'new value of ' + path, size: '12' });
    const form = el('form', {
      onsubmit: async (ev) => {
        ev.preventDefault();
        const o = await request('PUT', ep, path, cell, { type: 'text/plain', body: input.value });
        showValue(cell, o.error !== undefined ? o : { value: 'written: ' + input.value }, path);
      },
    }, input, el('button', { type: 'submit' }, 'Send'));
    cell.textContent = '';
    cell.append(form);
    input.focus();
  }

  async function execute(ep, path, cell) {
    const o = await request('POST', ep, path, cell, {});
    showValue(cell, o.error !== undefined ? o : { value: 'executed' }, path);
  }

  async function observe(ep, path, cell, button) {
    const k = ep + ' ' + path;
    try {
      if (observed.has(k)) {
        await api('DELETE', subUrl(ep, path));
        observed.delete(k);
        button.textContent = 'Observe';
        return;
      }
      observed.set(k, { ep, path, points: [] });
      button.textContent = 'Stop';
      plotted = k;
      drawPlot();
      const r = await api('PUT', subUrl(ep, path));
      if (r.json && r.json['async-response-id']) {
        const o = outcome(await awaitAsync(r.json['async-response-id']), path);
        showValue(cell, o, path);
        if (o.error === undefined) addPoint(k, o.value);
      }
    } catch (e) {
      observed.delete(k);
      button.textContent = 'Observe';
      cell.classList.add('err');
      cell.textContent = e.message;
    }
  }

  // ---- plot -------------------------------------------------------------------------
  function addPoint(k, value) {
    const o = observed.get(k);
    const v = typeof value === 'number' ? value : Number(value);
    if (!o || !Number.isFinite(v)) return;
    o.points.push({ t: Date.now(), v });
    if (o.points.length > POINTS_MAX) o.points.shift();
    if (plotted === k) drawPlot();
  }

  function drawPlot() {
    const o = plotted && observed.get(plotted);
    $('plot-box').hidden = !o;
    if (!o) return;
    const svg = $('plot');
    const ns = 'http://www.w3.org/2000/svg';
    const d = definition(o.path).resource;
    $('plot-title').textContent = `${o.ep} ${o.path}` + (d ? ` (${d.name})` : '');
    svg.textContent = '';
    svg.dataset.points = String(o.points.length);
    const W = 400, H = 140, L = 40, T = 10, B = 20;
    const pts = o.points;
    const stats = $('plot-stats');
    if (!pts.length) { stats.textContent = 'waiting for values…'; return; }
    let lo = Math.min(...pts.map((p) => p.v)), hi = Math.max(...pts.map((p) => p.v));
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1);
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - 5);
    const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    const node = (tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const [a, v] of Object.entries(attrs)) e.setAttribute(a, String(v));
      if (text !== undefined) e.textContent = text;
      svg.append(e);
    };
    node('text', { x: 2, y: T + 8 }, hi.toFixed(2));
    node('text', { x: 2, y: H - B }, lo.toFixed(2));
    node('text', { x: L, y: H - 4 }, new Date(t0).toLocaleTimeString());
    node('text', { x: W - 60, y: H - 4 }, new Date(t1).toLocaleTimeString());
    node('polyline', { points: pts.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ') });
    for (const p of pts.slice(-30)) node('circle', { cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 2 });
    const last = pts[pts.length - 1].v;
    stats.textContent = `${pts.length} points, last ${last}${d && d.units ? ' ' + d.units : ''}, min ${Math.min(...pts.map((p) => p.v))}, max ${Math.max(...pts.map((p) => p.v))}`;
  }

  // ---- events -----------------------------------------------------------------------
  function feedLine(kind, text) {
    const list = $('feed');
    list.prepend(el('li', { 'data-kind': kind }, el('time', {}, new Date().toLocaleTimeString()), el('span', { class: 'kind' }, kind), text));
    while (list.childElementCount > FEED_MAX) list.lastElementChild.remove();
  }

  function setStatus(name, status, extra) {
    const e = endpoints.get(name) || { name, type: '', q: false };
    endpoints.set(name, Object.assign(e, extra || {}, { status }));
  }

  // One NotificationMessage (a long-poll answer or a WebSocket frame).
  function handle(msg) {
    for (const r of msg.registrations || []) {
      setStatus(r.ep, 'registered', { type: r.ept || '', q: !!r.q });
      feedLine('registrations', `${r.ep} registered (${(r.resources || []).length} resources)`);
      if (r.ep === current) openEndpoint(r.ep);
    }
    for (const r of msg['reg-updates'] || []) {
      setStatus(r.ep, 'registered', { type: r.ept || '', q: !!r.q });
      feedLine('reg-updates', `${r.ep} updated its registration`);
    }
    for (const name of msg['de-registrations'] || []) { setStatus(name, 'de-registered'); feedLine('de-registrations', `${name} de-registered`); }
    for (const name of msg['registrations-expired'] || []) { setStatus(name, 'expired'); feedLine('registrations-expired', `${name} expired`); }
    if (msg.registrations || msg['reg-updates'] || msg['de-registrations'] || msg['registrations-expired']) endpointsChanged();
    for (const n of msg.notifications || []) {
      let o;
      try { o = { value: decode(n.ct, n.payload, n.path) }; } catch (e) { o = { error: 'cannot decode: ' + e.message }; }
      feedLine('notifications', `${n.ep} ${n.path} = ${o.error !== undefined ? o.error : show(o.value)}`);
      const k = n.ep + ' ' + n.path;
      if (o.error === undefined) addPoint(k, o.value);
      if (n.ep === current) {
        const cell = document.querySelector(`#tree td.value[data-value="${CSS.escape(n.path)}"]`);
        if (cell) showValue(cell, o, n.path);
      }
    }
    for (const r of msg['async-responses'] || []) {
      feedLine('async-responses', `${r.id} ${r.status}${r.error ? ' ' + r.error : ''}`);
      settle(r);
    }
    for (const s of msg['subscription-errors'] || []) {
      feedLine('subscription-errors', `${s.ep} ${s.path} ${s.status} ${s.error || ''}`);
      observed.delete(s.ep + ' ' + s.path);
    }
  }

  function feedMode(text) { $('feed-mode').textContent = text; }

  // The WebSocket channel when the daemon has it, else the long-poll. `tries`: failed
  // tries so far (a transient failure, such as a 503 or the network, is tried again).
  async function startFeed(tries = 0) {
    if (feed) feed.stop();
    // `key`: the key this feed was started for (a log-out and another log-in may come
    // while its calls are under way; they are aborted, and checked when they return).
    const me = { stopped: false, ws: null, abort: new AbortController(), key };
    me.stop = () => { me.stopped = true; me.abort.abort(); if (me.ws) me.ws.close(1000); };
    feed = me;
    const signal = me.abort.signal;
    try {
      // A key whose events go to a callback keeps it: registering a WebSocket channel would
      // replace it. The console then has no live events.
      const callback = await api('GET', '/v2/notification/callback', { signal }).then(() => true, (e) => {
        if (e.status === 404) return false;
        throw e;
      });
      if (me.stopped) return;
      if (callback) { feedMode('(none: this key delivers its events to a callback)'); return; }
      // The channel is made for this session unless the key had one (201, not 200): it is
      // removed again at log-out, so that the key's long-poll works as before.
      // Whether this session made it is kept in sessionStorage: after a reload the PUT
      // answers 200 (the channel exists), and the log-out must still remove it.
      // Not aborted at log-out (the daemon may have made the channel by then): checked
      // when it returns instead.
      const r = await api('PUT', '/v2/notification/websocket', { type: 'application/json', body: '{}' });
      if (me.stopped) {
        // Logged out while the channel was being made: one this call made goes again, with
        // the key it was made for.
        if (r.status === 201) {
          fetch('/v2/notification/websocket', { method: 'DELETE', headers: { Authorization: 'Bearer ' + me.key }, cache: 'no-store' }).catch(() => {});
        }
        return;
      }
      me.made = r.status === 201 || sessionStorage.getItem(MADE) === '1';
      if (me.made) sessionStorage.setItem(MADE, '1');
      websocket(me, 0);
    } catch (e) {
      if (me.stopped) return;
      if (e.status === 404 || e.status === 405) { longPoll(me); return; }
      feedLine('error', 'the WebSocket channel cannot be opened: ' + e.message);
      // What may pass (the network: 0; 429; 5xx such as 503) is tried again, backing off to
      // 30 s; anything else (403: no `notifications` scope, 409, 4xx) stays so.
      if (!(e.status === 0 || e.status === 429 || e.status >= 500)) { feedMode('(no live events)'); return; }
      feedMode('(no live events yet; trying again)');
      setTimeout(() => { if (!me.stopped) startFeed(tries + 1); }, Math.min(30000, 2000 * 2 ** tries));
    }
  }

  function websocket(me, failures) {
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/v2/notification/websocket-connect';
    const ws = new WebSocket(url, ['wss', 'pelion_ak_' + key]);
    me.ws = ws;
    let opened = false;
    ws.onopen = () => { opened = true; feedMode('(WebSocket)'); };
    ws.onmessage = (m) => {
      try { handle(JSON.parse(m.data)); } catch (e) { feedLine('error', 'a frame that is not a notification message: ' + e.message); }
    };
    ws.onclose = (c) => {
      if (me.stopped) return;
      if (c.code === 1008) { logout('The access key was revoked.'); return; }
      // Another socket of this key took the channel (another tab, another client), or the
      // channel was removed: taking it back would make the two take turns.
      // 1001 is either; the daemon's close reason says which.
      if (c.code === 1001) {
        feedMode(/removed/.test(c.reason || '')
          ? '(stopped: this key\'s WebSocket channel was removed (deleted, or replaced by a callback); log in again to make it again)'
          : '(stopped: another client of this key took the channel; log in again to take it back)');
        return;
      }
      const n = opened ? 0 : failures + 1;
      // 1011: the key has no WebSocket channel (removed meanwhile): make it again.
      if (c.code === 1011) {
        feedMode(`(WebSocket closed ${c.code}; opening the channel again)`);
        setTimeout(() => { if (!me.stopped) startFeed(); }, Math.min(30000, 2000 * 2 ** n));
        return;
      }
      feedMode(`(WebSocket closed ${c.code}; reconnecting)`);
      setTimeout(() => { if (!me.stopped) websocket(me, n); }, Math.min(30000, 1000 * 2 ** n));
    };
  }

  async function longPoll(me) {
    let failures = 0;
    // A first pull that does not wait makes the key's channel before the feed says it runs
    // (events from before a channel exists are not kept for it).
    let wait = '?noWait=true';
    while (!me.stopped) {
      try {
        const r = await api('GET', '/v2/notification/pull' + wait, { signal: me.abort.signal });
        if (wait) { wait = ''; feedMode('(long-poll)'); }
        failures = 0;
        if (r.status === 200 && r.json) handle(r.json);
      } catch (e) {
        if (me.stopped) return;
        if (e.status === 409) { feedMode('(none: this key delivers its events to a callback)'); return; }
        feedLine('error', e.message);
        failures += 1;
        await sleep(Math.min(30000, 1000 * 2 ** failures));
      }
    }
  }

  // ---- session ----------------------------------------------------------------------
  async function start() {
    const list = await api('GET', '/v2/endpoints');
    sessionStorage.setItem(STORE, key);
    if (!Object.keys(objects).length) {
      try { objects = (await (await fetch('/console/objects.json')).json()).objects || {}; } catch (_) { objects = {}; }
    }
    endpoints.clear();
    for (const e of list.json || []) endpoints.set(e.name, { name: e.name, type: e.type, q: !!e.q, status: 'registered' });
    $('login').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = false;
    $('who').textContent = 'logged in';
    showError('');
    renderEndpoints();
    startFeed();
  }

  function logout(why) {
    if (feed) {
      feed.stop();
      if (feed.made && key) api('DELETE', '/v2/notification/websocket').catch(() => {});
      feed = null;
    }
    sessionStorage.removeItem(STORE);
    sessionStorage.removeItem(MADE);
    key = null;
    // Nothing of this session stays on the page for the next key.
    current = null;
    endpoints.clear();
    observed.clear();
    pending.clear();
    early.clear();
    plotted = null;
    drawPlot();
    for (const id of ['plot', 'plot-title', 'plot-stats']) $(id).textContent = '';
    $('search').value = '';
    $('ep-list').textContent = '';
    $('dev-title').textContent = 'Select an endpoint';
    $('app').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    $('who').textContent = '';
    $('tree').textContent = '';
    $('feed').textContent = '';
    showError(why || '');
  }

  $('login').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    key = $('key').value.trim();
    $('key').value = '';
    if (!key) return;
    try { await start(); } catch (e) { if (key) { showError('Cannot log in: ' + e.message); key = null; } }
  });
  $('logout').addEventListener('click', () => logout(''));
  $('search').addEventListener('input', renderEndpoints);
  if (key) start().catch((e) => { if (key) showError(e.message); });
})();
