// Stemflow topology page: draws /api/v1/topology every second as an SVG map
// of the datacenters and their links (coloured by RTT or by load, thicker
// with more streams) and highlights the selected stream's tree. Everything is built
// with DOM calls and textContent: no data ever becomes markup. Tests read
// window.stemflowTopology.
'use strict';

(() => {
  const REFRESH = 1000; // ms between refreshes
  const SVG = 'http://www.w3.org/2000/svg';
  const W = 800;
  const H = 520;
  const R = 30; // datacenter circle radius

  const map = document.getElementById('map');
  const picker = document.getElementById('stream');
  const colourBy = document.getElementById('colour-by');
  const legends = { rtt: document.getElementById('legend-rtt'), load: document.getElementById('legend-load') };
  const leaderTag = document.getElementById('leader');
  const sourceTag = document.getElementById('source');
  const sourceNote = document.getElementById('source-note');
  const topoError = document.getElementById('topo-error');
  const updated = document.getElementById('updated');
  const treePath = document.getElementById('tree-path');

  /** What the page shows; end-to-end tests poll it. */
  const state = {
    updated: 0, // Date.now() of the last drawing
    source: '',
    leader: '',
    stream: new URLSearchParams(location.search).get('stream') || '',
    colourBy: 'rtt', // or 'load'
    datacenters: [],
    treeEdges: [], // [from, to] of the selected tree, as drawn
    error: '',
  };
  window.stemflowTopology = state;

  let last = null; // the last answer, redrawn when the picker changes

  colourBy.addEventListener('change', () => {
    state.colourBy = colourBy.value === 'load' ? 'load' : 'rtt';
    legends.rtt.hidden = state.colourBy !== 'rtt';
    legends.load.hidden = state.colourBy !== 'load';
    if (last) draw(last);
  });

  picker.addEventListener('change', () => {
    state.stream = picker.value;
    const url = new URL(location.href);
    if (state.stream) url.searchParams.set('stream', state.stream);
    else url.searchParams.delete('stream');
    history.replaceState(null, '', url);
    if (last) draw(last);
  });

  /** An SVG element with attributes; children appended. */
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children) e.append(c);
    return e;
  }

  /** A <title> child: the tooltip of an SVG element. */
  function title(text) {
    const t = document.createElementNS(SVG, 'title');
    t.textContent = text;
    return t;
  }

  function num(v) {
    const n = Number(v);
    return Number.isFinite(n) ? n : 0;
  }

  function ms(v) {
    const n = num(v);
    return `${n.toFixed(n < 10 ? 1 : 0)} ms`;
  }

  /** The colour class of a round-trip time. */
  function rttClass(rtt) {
    if (rtt < 20) return 'rtt-low';
    if (rtt < 80) return 'rtt-mid';
    if (rtt < 150) return 'rtt-high';
    return 'rtt-bad';
  }

  /** The colour class of a link's use of its bandwidth (0 to 1, or null when not measured). */
  function loadClass(use, kbps) {
    if (use === null) return kbps > 0 ? 'load-unknown' : 'load-low';
    if (use < 0.5) return 'load-low';
    if (use < 0.8) return 'load-mid';
    if (use < 0.95) return 'load-high';
    return 'load-bad';
  }

  /** Places the datacenters on a circle, in name order. */
  function layout(names) {
    const pos = new Map();
    const cx = W / 2;
    const cy = H / 2;
    if (names.length === 1) {
      pos.set(names[0], { x: cx, y: cy });
      return pos;
    }
    const r = Math.min(W, H) / 2 - R - 40;
    names.forEach((n, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / names.length;
      pos.set(n, { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a) });
    });
    return pos;
  }

  /** Merges the two directions of each link into one line to draw. */
  function pairs(links) {
    const out = new Map();
    for (const l of links) {
      const from = String(l.from);
      const to = String(l.to);
      const key = from < to ? `${from}\u0000${to}` : `${to}\u0000${from}`;
      let p = out.get(key);
      if (!p) {
        p = { a: from < to ? from : to, b: from < to ? to : from, rtt: 0, loss: 0, streams: 0, kbps: 0, use: null, up: false, dirs: [] };
        out.set(key, p);
      }
      p.dirs.push(l);
      p.streams += num(l.streams);
      p.kbps = Math.max(p.kbps, num(l.load_kbps));
      if (num(l.bandwidth_kbps) > 0) p.use = Math.max(p.use || 0, num(l.load_kbps) / num(l.bandwidth_kbps));
      if (!l.down) {
        p.up = true;
        p.rtt = Math.max(p.rtt, num(l.rtt_ms));
        p.loss = Math.max(p.loss, num(l.loss));
      }
    }
    return [...out.values()];
  }

  /**
   * The segment from p to q shortened to the circles' edges and moved
   * sideways by `side`, so that a tree edge runs beside its link (both stay
   * visible) and the two directions of a pair do not overlap.
   */
  function beside(p, q, side) {
    const dx = q.x - p.x;
    const dy = q.y - p.y;
    const len = Math.hypot(dx, dy) || 1;
    const ox = (-dy / len) * side;
    const oy = (dx / len) * side;
    const s = toward(p, q, R + 2);
    const t = toward(q, p, R + 4);
    return { x1: s.x + ox, y1: s.y + oy, x2: t.x + ox, y2: t.y + oy };
  }

  /** A point moved from p towards q by d (to start lines at a circle's edge). */
  function toward(p, q, d) {
    const dx = q.x - p.x;
    const dy = q.y - p.y;
    const len = Math.hypot(dx, dy) || 1;
    return { x: p.x + (dx * d) / len, y: p.y + (dy * d) / len };
  }

  function linkTitle(p) {
    const lines = [`${p.a} – ${p.b}`];
    for (const l of p.dirs) {
      const parts = [`${l.from} → ${l.to}:`];
      if (l.down) parts.push('down');
      else {
        parts.push(`RTT ${ms(l.rtt_ms)}`);
        if (num(l.jitter_ms)) parts.push(`jitter ${ms(l.jitter_ms)}`);
        parts.push(`loss ${(num(l.loss) * 100).toFixed(1)} %`);
        if (num(l.bandwidth_kbps)) parts.push(`bandwidth ${stemflow.formatBitrate(num(l.bandwidth_kbps) * 1000)}`);
      }
      parts.push(`${num(l.streams)} stream(s)`);
      if (num(l.load_kbps)) parts.push(`load ${stemflow.formatBitrate(num(l.load_kbps) * 1000)}`);
      lines.push(parts.join(' '));
    }
    return lines.join('\n');
  }

  function updatePicker(trees) {
    const names = trees.map((t) => String(t.stream));
    if (state.stream && !names.includes(state.stream)) names.push(state.stream);
    names.sort();
    const have = [...picker.options].slice(1).map((o) => o.value);
    if (have.join('\u0000') !== names.join('\u0000')) {
      const opts = names.map((n) => {
        const o = document.createElement('option');
        o.value = n;
        o.textContent = trees.some((t) => t.stream === n) ? n : `${n} (no tree)`;
        return o;
      });
      picker.replaceChildren(picker.options[0], ...opts);
    }
    if (!state.stream && names.length === 1) state.stream = names[0];
    picker.value = state.stream;
  }

  function draw(topo) {
    const nodes = Array.isArray(topo.nodes) ? topo.nodes : [];
    const links = Array.isArray(topo.links) ? topo.links : [];
    const trees = Array.isArray(topo.trees) ? topo.trees : [];
    const here = String(topo.datacenter || '');
    const leader = String(topo.leader || '');
    updatePicker(trees);
    const tree = trees.find((t) => t.stream === state.stream) || null;
    const edges = tree && Array.isArray(tree.edges) ? tree.edges : [];
    const backup = tree && tree.backup && typeof tree.backup === 'object' ? tree.backup : {};

    const names = nodes.map((n) => String(n.dc)).sort();
    const pos = layout(names);

    const defs = svg('defs', {},
      svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 14, markerHeight: 14, markerUnits: 'userSpaceOnUse', orient: 'auto' },
        svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrow-head' })));
    const linkLayer = svg('g', { class: 'links' });
    const treeLayer = svg('g', { class: 'tree' });
    const dcLayer = svg('g', { class: 'dcs' });

    for (const p of pairs(links)) {
      const a = pos.get(p.a);
      const b = pos.get(p.b);
      if (!a || !b) continue;
      const width = 2 + 2 * Math.min(p.streams, 6);
      const colour = state.colourBy === 'load' ? loadClass(p.use, p.kbps) : rttClass(p.rtt);
      const cls = `link ${p.up ? colour : 'down'}`;
      const g = svg('g', { class: cls, 'data-a': p.a, 'data-b': p.b, 'data-rtt': p.rtt, 'data-streams': p.streams, 'data-load-kbps': p.kbps },
        svg('line', { x1: a.x, y1: a.y, x2: b.x, y2: b.y, 'stroke-width': width }),
        title(linkTitle(p)));
      const mid = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
      let label = 'down';
      if (p.up && state.colourBy === 'load') {
        label = (p.kbps ? stemflow.formatBitrate(p.kbps * 1000) : `${p.streams}▸`) + (p.use === null ? '' : ` · ${Math.round(p.use * 100)} %`);
      } else if (p.up) {
        label = ms(p.rtt) + (p.streams ? ` · ${p.streams}▸` : '');
      }
      g.append(svg('text', { x: mid.x, y: mid.y + 4, class: 'link-label' }, label)); // on the line: tree edges run beside it
      linkLayer.append(g);
    }

    const drawnEdges = [];
    for (const e of edges) {
      const from = String(e.from);
      const to = String(e.to);
      const a = pos.get(from);
      const b = pos.get(to);
      if (!a || !b) continue;
      const delay = e.delay_ms === null || e.delay_ms === undefined ? '' : `, delay ${ms(e.delay_ms)}`;
      treeLayer.append(svg('line', {
        class: 'tree-edge', 'data-from': from, 'data-to': to, ...beside(a, b, 11), 'marker-end': 'url(#arrow)',
      }, title(`${state.stream}: ${from} → ${to}${delay}`)));
      drawnEdges.push([from, to]);
    }
    for (const [dc, parent] of Object.entries(backup)) {
      const a = pos.get(String(parent));
      const b = pos.get(String(dc));
      if (!a || !b) continue;
      treeLayer.append(svg('line', {
        class: 'backup-edge', 'data-from': String(parent), 'data-to': String(dc), ...beside(a, b, 11), 'marker-end': 'url(#arrow)',
      }, title(`${state.stream}: ${dc} switches to ${parent} if its parent dies`)));
    }

    const inTree = new Set(drawnEdges.flat());
    for (const n of nodes) {
      const dc = String(n.dc);
      const p = pos.get(dc);
      const cls = ['dc', n.up ? 'up' : 'down'];
      if (dc === here) cls.push('here');
      if (dc === leader) cls.push('leader');
      if (tree && dc === tree.origin) cls.push('origin');
      else if (inTree.has(dc)) cls.push('in-tree');
      const ids = Array.isArray(n.nodes) && n.nodes.length ? ` (nodes ${n.nodes.join(', ')})` : '';
      const roles = [n.up ? 'up' : 'down'];
      if (dc === here) roles.push('serves this page');
      if (dc === leader) roles.push('its manager leads');
      if (tree && dc === tree.origin) roles.push(`origin of ${state.stream}`);
      const g = svg('g', { class: cls.join(' '), 'data-dc': dc, transform: `translate(${p.x} ${p.y})` },
        svg('circle', { r: R }),
        svg('text', { class: 'dc-name', y: 6 }, dc),
        title(`datacenter ${dc}${ids}: ${roles.join(', ')}`));
      if (dc === leader) g.append(svg('text', { class: 'dc-note', y: -R - 8 }, 'leader'));
      if (dc === here) g.append(svg('text', { class: 'dc-note', y: R + 18 }, 'you are here'));
      dcLayer.append(g);
    }

    map.replaceChildren(defs, linkLayer, treeLayer, dcLayer);

    if (tree) {
      const hops = edges.map((e) => `${e.from} → ${e.to}` +
        (e.delay_ms === null || e.delay_ms === undefined ? '' : ` ${ms(e.delay_ms)}`));
      const back = Object.entries(backup).map(([dc, p]) => `${dc} ⇢ ${p}`);
      const rate = num(tree.bitrate_kbps) ? ` · ${stemflow.formatBitrate(num(tree.bitrate_kbps) * 1000)}` : '';
      const how = tree.version ? ` · route v${tree.version}` : ' · no route: as announcements lead it';
      treePath.textContent = `${state.stream} from ${tree.origin}: ${hops.join(', ') || 'no hop yet'}` +
        (back.length ? ` · backups ${back.join(', ')}` : '') + rate + how +
        (edges.some((e) => e.delay_ms !== null && e.delay_ms !== undefined) ? ' · hop delays one-way (half the RTT)' : '');
    } else {
      treePath.textContent = state.stream ? `${state.stream} has no tree right now.` : (trees.length ? 'Pick a stream to see its tree.' : 'No stream is live.');
    }

    state.source = String(topo.source || '');
    state.leader = leader;
    state.datacenters = names;
    state.treeEdges = drawnEdges;
  }

  async function refresh() {
    try {
      const res = await fetch('/api/v1/topology', { cache: 'no-store' });
      if (!res.ok) {
        const text = (await res.text()).trim();
        throw new stemflow.HTTPError(res.status, text || `${res.status} ${res.statusText}`);
      }
      const topo = await res.json();
      last = topo;
      draw(topo);
      stemflow.showDatacenter(String(topo.datacenter || ''));
      leaderTag.textContent = topo.leader ? `manager leader: ${topo.leader}` : 'no manager leads';
      sourceTag.textContent = `source: ${topo.source || '?'}`;
      sourceNote.hidden = topo.source !== 'local';
      sourceNote.textContent = topo.etcd_error
        ? `This node cannot read the control plane: ${topo.etcd_error}`
        : 'This node runs without etcd: the map shows only its own links and the paths of the streams that reach it.';
      topoError.hidden = true;
      state.error = '';
      state.updated = Date.now();
      updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      state.error = err.message;
      topoError.textContent = `Cannot load the topology: ${err.message}. Retrying…`;
      topoError.hidden = false;
    }
  }

  async function loop() {
    for (;;) {
      await refresh();
      await stemflow.sleep(document.hidden ? REFRESH * 5 : REFRESH);
    }
  }
  loop();
})();
