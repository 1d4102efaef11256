"""The one vanilla-JS renderer behind every headlab HTML view (no CDN, no network, no framework).

`RENDERER_JS` defines `window.__headlabView` once per page (guarded by a version): `render(el)` draws the view whose
JSON payload sits in `el`'s `data-headlab` attribute; `renderAll(root)` draws every `.headlab-view` under `root` that
is not drawn yet or whose payload changed. Token text only ever reaches the page through `textContent` and `title`
(never `innerHTML`), so a token such as `</script><img onerror=...>` is shown, not run.

Clicking a head (a grid cell, or a head's card in a layer view) dispatches a bubbling `headlab-head` event whose
`detail.head` is the head's label (`L1H2`); the explorer listens for it.
"""

from __future__ import annotations

RENDERER_JS = r"""
(function () {
  const VERSION = 1;
  if (window.__headlabView && window.__headlabView.version === VERSION) return;
  const CSS = `
.hlv{font:13px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;background:#fff;padding:6px 4px;
  max-width:100%;box-sizing:border-box}
.hlv *{box-sizing:border-box}
.hlv-title{font-weight:600;margin:0 0 2px}
.hlv-note{color:#555;font-size:12px;margin:0 0 6px}
.hlv-controls{display:flex;gap:6px;align-items:center;flex-wrap:wrap;margin:4px 0 6px;font-size:12px}
.hlv .hlv-controls button{font:inherit!important;font-size:12px!important;padding:2px 8px!important;
  border:1px solid #bbb!important;background:#f6f6f6!important;border-radius:4px!important;cursor:pointer;
  color:#222!important;min-width:0!important;box-shadow:none!important;width:auto!important}
.hlv .hlv-controls button.on{background:#1f77b4!important;color:#fff!important;border-color:#1f77b4!important}
.hlv-heads{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 8px}
.hlv-card{border:1px solid #ddd;border-radius:4px;padding:3px;cursor:pointer;background:#fff;font-size:11px;
  max-width:170px}
.hlv-card.on{border-color:#1f77b4;box-shadow:0 0 0 2px #1f77b455}
.hlv-card canvas{display:block;image-rendering:pixelated;border:1px solid #eee}
.hlv-card .hlv-label{font-weight:600}
.hlv-card .hlv-top{color:#444;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.hlv-tokens{line-height:1.9;max-height:420px;overflow:auto;border:1px solid #eee;padding:4px;border-radius:4px}
.hlv-tok{display:inline-block;white-space:pre;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
  padding:0 2px;margin:1px 1px;border-radius:3px;border:1px solid #e4e4e4;cursor:pointer;min-width:8px}
.hlv-tok.sel{outline:2px solid #ff7f0e;outline-offset:0}
.hlv-tok.lock{outline:2px solid #d62728}
.hlv-detail{margin-top:6px;font-size:12px;color:#333;white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace}
.hlv-legend{font-size:11px;color:#555}
.hlv-grid{border-collapse:collapse;font-size:10px}
.hlv-grid td,.hlv-grid th{padding:0;text-align:center;font-weight:normal;color:#555}
.hlv-grid td.hlv-cell{width:22px;height:16px;border:1px solid #fff;cursor:pointer}
.hlv-grid td.hlv-cell.on{outline:2px solid #ff7f0e}
`;
  function style() {
    if (document.getElementById('headlab-view-style')) return;
    const s = document.createElement('style');
    s.id = 'headlab-view-style';
    s.textContent = CSS;
    document.head.appendChild(s);
  }
  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const shown = (t) => (t.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5').replace(/\r/g, '\u240d') || '\u2205');
  const fmt = (x) => (x === null || x === undefined || Number.isNaN(x) ? 'n/a' : (+x).toFixed(4));
  // unsigned: blues by w / max; signed (GLA / DeltaNet patterns): red > 0, blue < 0, by |w| / max|w|
  function paint(e, w, max, signed) {
    if (w === null || w === undefined || !(max > 0) || w === 0) { e.style.background = ''; e.style.color = ''; return; }
    const a = Math.min(1, Math.abs(w) / max);
    const rgb = signed ? (w > 0 ? '214,39,40' : '31,119,180') : '31,119,180';
    e.style.background = `rgba(${rgb},${a.toFixed(3)})`;
    e.style.color = a > 0.55 ? '#fff' : '';
  }
  function emitHead(el, label) {
    if (/^L\d+H\d+$/.test(label)) el.dispatchEvent(new CustomEvent('headlab-head', {bubbles: true, detail: {head: label}}));
  }
  function header(root, p) {
    if (p.title) root.appendChild(h('div', 'hlv-title', p.title));
    if (p.note) root.appendChild(h('div', 'hlv-note', p.note));
  }
  function toggle(parent, label, options, value, onchange) {
    const box = h('span');
    box.appendChild(h('span', '', label));
    const buttons = options.map(([key, text]) => {
      const b = h('button', key === value ? 'on' : '', text);
      b.type = 'button';
      b.dataset.key = key;
      b.onclick = () => { buttons.forEach((x) => x.classList.toggle('on', x === b)); onchange(key); };
      box.appendChild(b);
      return b;
    });
    parent.appendChild(box);
    return box;
  }
  function tokenStrip(root, p, onpick, onhover) {
    const strip = h('div', 'hlv-tokens');
    const spans = p.tokens.map((t, i) => {
      const s = h('span', 'hlv-tok', shown(t));
      s.dataset.i = i;
      s.title = `${i}: ${JSON.stringify(t)}`;
      s.onmouseenter = () => onhover(i);
      s.onclick = () => onpick(i);
      strip.appendChild(s);
      return s;
    });
    strip.onmouseleave = () => onhover(null);
    root.appendChild(strip);
    return spans;
  }
  function label(p, i) { return `${i}:${JSON.stringify(p.tokens[i])}`; }

  // dense view: every head's exact pattern (weights x scale as integers, rows trimmed after their last nonzero)
  function dense(root, p) {
    const H = p.labels.length, T = p.tokens.length, q0 = p.q_offset || 0;
    const w = (hd, q, s) => {
      const row = p.rows[hd][q - q0];
      return row && s < row.length ? row[s] / p.scale : 0;
    };
    const st = {head: Math.min(p.focus || 0, H - 1), dir: 'row', hover: null, lock: null};
    const controls = h('div', 'hlv-controls');
    toggle(controls, 'colour tokens by: ', [['row', 'where it attends (row)'], ['col', 'what attends to it (column)']],
      'row', (k) => { st.dir = k; update(); });
    const legend = h('span', 'hlv-legend');
    controls.appendChild(legend);
    root.appendChild(controls);
    const cards = [];
    if (H > 1) {
      const heads = h('div', 'hlv-heads');
      for (let hd = 0; hd < H; hd++) {
        const card = h('div', 'hlv-card');
        card.dataset.head = p.labels[hd];
        card.appendChild(h('div', 'hlv-label', p.labels[hd]));
        const n = Math.min(T, 96), c = document.createElement('canvas');
        c.width = n; c.height = n; c.style.width = '96px'; c.style.height = '96px';
        card.appendChild(c);
        const top = h('div', 'hlv-top', '');
        card.appendChild(top);
        card.onclick = () => { st.head = hd; update(); emitHead(root, p.labels[hd]); };
        heads.appendChild(card);
        cards.push({card, c, top, n, image: null});
      }
      root.appendChild(heads);
    }
    const spans = tokenStrip(root, p, (i) => { st.lock = st.lock === i ? null : i; update(); },
      (i) => { st.hover = i; if (st.lock === null) update(); });
    const detail = h('div', 'hlv-detail', 'hover over a token (click to keep it)');
    root.appendChild(detail);
    function values(hd, i) {  // the row or column of token i under head hd, over all tokens
      const out = new Array(T).fill(null);
      for (let j = 0; j < T; j++) {
        if (st.dir === 'row') out[j] = i >= q0 ? w(hd, i, j) : null;
        else out[j] = j >= q0 ? w(hd, j, i) : null;
      }
      return out;
    }
    function top(vals, k) {
      return vals.map((v, j) => [v, j]).filter(([v]) => v).sort((a, b) => Math.abs(b[0]) - Math.abs(a[0])).slice(0, k);
    }
    function thumb(x, hd) {  // max |w| per block of the pattern, drawn once; the selected row / column marked
      const ctx = x.c.getContext('2d');
      if (!x.image) {
        const img = ctx.createImageData(x.n, x.n), f = T / x.n, m = new Float32Array(x.n * x.n);
        let max = 0, neg = false;
        for (let q = q0; q < T; q++) for (let s = 0; s < T; s++) {
          const v = w(hd, q, s);
          if (!v) continue;
          const k = Math.floor(q / f) * x.n + Math.floor(s / f);
          if (Math.abs(v) > Math.abs(m[k])) m[k] = v;
          max = Math.max(max, Math.abs(v)); neg = neg || v < 0;
        }
        for (let k = 0; k < m.length; k++) {
          const a = max > 0 ? Math.sqrt(Math.abs(m[k]) / max) : 0;
          const rgb = neg && m[k] > 0 ? [214, 39, 40] : [31, 119, 180];
          img.data[4 * k] = 255 - a * (255 - rgb[0]); img.data[4 * k + 1] = 255 - a * (255 - rgb[1]);
          img.data[4 * k + 2] = 255 - a * (255 - rgb[2]); img.data[4 * k + 3] = 255;
        }
        x.image = img;
      }
      ctx.putImageData(x.image, 0, 0);
      const i = st.lock !== null ? st.lock : st.hover;
      if (i !== null) {
        const pos = Math.floor(i / (T / x.n)) + 0.5;
        ctx.strokeStyle = 'rgba(255,127,14,0.9)'; ctx.lineWidth = 1; ctx.beginPath();
        if (st.dir === 'row') { ctx.moveTo(0, pos); ctx.lineTo(x.n, pos); } else { ctx.moveTo(pos, 0); ctx.lineTo(pos, x.n); }
        ctx.stroke();
      }
    }
    function update() {
      const i = st.lock !== null ? st.lock : st.hover;
      cards.forEach((x, hd) => {
        x.card.classList.toggle('on', hd === st.head);
        thumb(x, hd);
        x.top.textContent = i === null ? '' : top(values(hd, i), 2).map(([v, j]) => `${shown(p.tokens[j])} ${fmt(v)}`).join(', ');
      });
      spans.forEach((s, j) => { s.classList.toggle('sel', j === i); s.classList.toggle('lock', j === st.lock); });
      if (i === null) {
        spans.forEach((s) => { paint(s, 0, 0, false); delete s.dataset.w; });
        legend.textContent = `${p.labels[st.head]}${p.signed ? ' (signed weights: red > 0, blue < 0)' : ''}`;
        detail.textContent = 'hover over a token (click to keep it)';
        return;
      }
      const vals = values(st.head, i);
      const max = Math.max(0, ...vals.map((v) => Math.abs(v || 0)));
      spans.forEach((s, j) => {
        paint(s, vals[j], max, p.signed);
        if (vals[j] === null) delete s.dataset.w; else s.dataset.w = fmt(vals[j]);
        s.title = `${j}: ${JSON.stringify(p.tokens[j])}` + (vals[j] === null ? '' : ` weight ${fmt(vals[j])}`);
      });
      legend.textContent = `${p.labels[st.head]}: colour = |weight| / ${fmt(max)}` +
        (p.signed ? ' (signed weights: red > 0, blue < 0)' : '');
      const rowTop = i >= q0 ? top(values(st.head, i).map((v, j) => (st.dir === 'row' ? v : w(st.head, i, j))), 8) : [];
      const colTop = top(Array.from({length: T}, (_, j) => (j >= q0 ? w(st.head, j, i) : null)), 8);
      detail.textContent = `${p.labels[st.head]}, token ${label(p, i)}\n` +
        `attends to:      ${rowTop.map(([v, j]) => `${label(p, j)} ${fmt(v)}`).join(', ') || '(nothing)'}\n` +
        `attended by:     ${colTop.map(([v, j]) => `${label(p, j)} ${fmt(v)}`).join(', ') || '(nothing)'}`;
    }
    update();
  }

  // long prompts: per-token statistics and each query's top-k keys (exact weights), never the T x T matrix
  function stats(root, p) {
    const H = p.labels.length, T = p.tokens.length;
    const names = [['entropy', 'entropy of its row (nats)'], ['received', 'attention received'],
      ['column', 'column score (received / queries that see it)']];
    const stat = (hd, name, j) => {
      if (name === 'column') { const n = p.n_visible[j]; return n > 0 ? p.received[hd][j] / n : null; }
      return p[name][hd][j];
    };
    const inverse = p.topk_idx.map((rows, hd) => {  // key -> [[query, weight x scale]] among the queries' top-k
      const inv = Array.from({length: T}, () => []);
      rows.forEach((keys, q) => keys.forEach((k, r) => inv[k].push([q, p.topk_w[hd][q][r]])));
      return inv;
    });
    const st = {head: Math.min(p.focus || 0, H - 1), stat: 'entropy', hover: null, lock: null};
    const controls = h('div', 'hlv-controls');
    toggle(controls, 'colour tokens by: ', names.map(([k]) => [k, k]), 'entropy', (k) => { st.stat = k; update(); });
    const legend = h('span', 'hlv-legend');
    controls.appendChild(legend);
    root.appendChild(controls);
    const cards = [];
    if (H > 1) {
      const heads = h('div', 'hlv-heads');
      for (let hd = 0; hd < H; hd++) {
        const card = h('div', 'hlv-card');
        card.dataset.head = p.labels[hd];
        card.appendChild(h('div', 'hlv-label', p.labels[hd]));
        const c = document.createElement('canvas');
        c.width = 160; c.height = 32;
        card.appendChild(c);
        const top = h('div', 'hlv-top', '');
        card.appendChild(top);
        card.onclick = () => { st.head = hd; update(); emitHead(root, p.labels[hd]); };
        heads.appendChild(card);
        cards.push({card, c, top});
      }
      root.appendChild(heads);
    }
    const spans = tokenStrip(root, p, (i) => { st.lock = st.lock === i ? null : i; update(); },
      (i) => { st.hover = i; if (st.lock === null) update(); });
    const detail = h('div', 'hlv-detail', '');
    root.appendChild(detail);
    function spark(x, hd) {  // the chosen statistic over positions, max per pixel column
      const ctx = x.c.getContext('2d'), W = x.c.width, Hh = x.c.height;
      ctx.clearRect(0, 0, W, Hh);
      const cols = new Array(W).fill(null);
      let max = 0;
      for (let j = 0; j < T; j++) {
        const v = stat(hd, st.stat, j), c = Math.floor(j * W / T);
        if (v === null || v === undefined) continue;
        cols[c] = cols[c] === null ? v : Math.max(cols[c], v);
        max = Math.max(max, Math.abs(v));
      }
      ctx.fillStyle = '#1f77b4';
      cols.forEach((v, c) => { if (v !== null && max > 0) { const y = Math.abs(v) / max * (Hh - 1); ctx.fillRect(c, Hh - y, 1, y); } });
    }
    function update() {
      const i = st.lock !== null ? st.lock : st.hover;
      cards.forEach((x, hd) => {
        x.card.classList.toggle('on', hd === st.head);
        spark(x, hd);
        const keys = i === null ? [] : (p.topk_idx[hd][i] || []);
        x.top.textContent = keys.slice(0, 2).map((k, r) => `${shown(p.tokens[k])} ${fmt(p.topk_w[hd][i][r] / p.scale)}`).join(', ');
      });
      spans.forEach((s, j) => { s.classList.toggle('sel', j === i); s.classList.toggle('lock', j === st.lock); });
      if (i === null) {  // no token chosen: every token coloured by the statistic
        const vals = p.tokens.map((_, j) => stat(st.head, st.stat, j));
        const max = Math.max(0, ...vals.map((v) => Math.abs(v || 0)));
        spans.forEach((s, j) => {
          paint(s, vals[j], max, false);
          delete s.dataset.w;
          s.dataset.stat = fmt(vals[j]);
          s.title = `${j}: ${JSON.stringify(p.tokens[j])} ${st.stat} ${fmt(vals[j])}`;
        });
        legend.textContent = `${p.labels[st.head]}: colour = ${st.stat} / ${fmt(max)}`;
        detail.textContent = `hover over a token for its top-${p.k} keys and the queries whose top-${p.k} hold it`;
        return;
      }
      const vals = new Array(T).fill(null);  // its top-k keys, and the queries that have it among theirs
      const keys = p.topk_idx[st.head][i] || [];
      keys.forEach((k, r) => { vals[k] = p.topk_w[st.head][i][r] / p.scale; });
      const by = inverse[st.head][i].filter(([q]) => q !== i);
      by.forEach(([q, v]) => { if (vals[q] === null) vals[q] = v / p.scale; });
      const max = Math.max(0, ...vals.map((v) => Math.abs(v || 0)));
      spans.forEach((s, j) => {
        paint(s, vals[j], max, p.signed);
        if (vals[j] === null) delete s.dataset.w; else s.dataset.w = fmt(vals[j]);
        s.title = `${j}: ${JSON.stringify(p.tokens[j])}` + (vals[j] === null ? '' : ` weight ${fmt(vals[j])}`);
      });
      legend.textContent = `${p.labels[st.head]}: colour = |weight| / ${fmt(max)} (its top-${p.k} keys, and the ` +
        `queries whose top-${p.k} hold it)`;
      detail.textContent = `${p.labels[st.head]}, token ${label(p, i)}: entropy ${fmt(p.entropy[st.head][i])}, ` +
        `received ${fmt(p.received[st.head][i])} from ${p.n_visible[i]} queries\n` +
        `top-${p.k} keys:  ${keys.map((k, r) => `${label(p, k)} ${fmt(p.topk_w[st.head][i][r] / p.scale)}`).join(', ') || '(none)'}\n` +
        `in the top-${p.k} of ${by.length} queries: ` +
        `${by.slice().sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 8).map(([q, v]) => `${label(p, q)} ${fmt(v / p.scale)}`).join(', ')}`;
    }
    update();
  }

  // layer x head grid: one cell per head, hover for the value, click to select it
  function grid(root, p) {
    const L = p.values.length, Hn = L ? p.values[0].length : 0;
    const flat = p.values.flat().filter((v) => v !== null);
    const lo = Math.min(0, ...flat), hi = Math.max(0, ...flat);
    const signed = lo < 0, max = Math.max(Math.abs(lo), Math.abs(hi));
    const table = h('table', 'hlv-grid');
    const head = h('tr');
    head.appendChild(h('th', '', ''));
    for (let c = 0; c < Hn; c++) head.appendChild(h('th', '', `H${c}`));
    table.appendChild(head);
    const info = h('div', 'hlv-detail', `${p.colorbar}: ${signed ? 'red > 0, blue < 0' : 'darker = higher'}` +
      ` (max |value| ${fmt(max)}); hover a cell for its value, click to select it`);
    const cells = [];
    for (let r = 0; r < L; r++) {
      const tr = h('tr');
      tr.appendChild(h('th', '', `L${r}`));
      for (let c = 0; c < Hn; c++) {
        const v = p.values[r][c], td = h('td', 'hlv-cell'), name = `L${r}H${c}`;
        td.dataset.head = name;
        td.dataset.v = fmt(v);
        td.title = `${name}: ${fmt(v)}`;
        if (v === null) td.style.background = '#eee'; else paint(td, v === 0 ? 1e-12 : v, max, signed);
        td.onclick = () => {
          cells.forEach((x) => x.classList.toggle('on', x === td));
          info.textContent = `selected ${name}: ${p.colorbar} ${fmt(v)}`;
          emitHead(root, name);
        };
        cells.push(td);
        tr.appendChild(td);
      }
      table.appendChild(tr);
    }
    root.appendChild(table);
    root.appendChild(info);
  }

  function render(el) {
    if (!el) return;
    style();
    const key = el.getAttribute('data-headlab') || '';
    let p;
    try { p = JSON.parse(key); } catch (err) { el.textContent = `headlab view: unreadable payload (${err})`; return; }
    el.__headlabKey = key;
    el.textContent = '';
    const root = h('div', 'hlv');
    header(root, p);
    el.appendChild(root);
    ({tokens: dense, stats: stats, grid: grid})[p.kind](root, p);
  }
  function renderAll(root) {
    (root || document).querySelectorAll('.headlab-view').forEach((el) => {
      if (el.__headlabKey !== el.getAttribute('data-headlab')) render(el);
    });
  }
  window.__headlabView = {version: VERSION, render, renderAll};
})();
"""
