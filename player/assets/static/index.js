// Stemflow stream list: polls /api/v1/streams every few seconds and offers a
// form to open the publisher (or the player) for a stream name.
'use strict';

(() => {
  const REFRESH = 3000; // ms between refreshes

  const table = document.getElementById('streams');
  const rows = document.getElementById('rows');
  const empty = document.getElementById('empty');
  const listError = document.getElementById('list-error');
  const updated = document.getElementById('updated');
  const form = document.getElementById('publish-form');
  const input = document.getElementById('name');

  document.getElementById('whip-url').textContent = `${location.origin}/whip/NAME`;

  const meters = new Map(); // stream name → RateMeter over its byte counter

  /** Builds an element: el('td', {className: 'num'}, 'text', child, …). */
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    Object.assign(e, props);
    for (const c of children) e.append(c);
    return e;
  }

  /** A track's label, e.g. "H264" or "opus" (see docs/api.md). */
  function trackLabel(t) {
    return String(t.codec || t.kind || '?');
  }

  /** The viewers cell: local viewers of every protocol, the split in its title. */
  function viewersCell(s) {
    const v = s.viewers || {};
    const whep = Number(v.whep) || 0;
    const rtsp = Number(v.rtsp) || 0;
    return el('td', { className: 'num', textContent: String(whep + rtsp), title: `WebRTC (WHEP) ${whep}, RTSP ${rtsp}` });
  }

  function row(s, here, now) {
    let meter = meters.get(s.name);
    const first = !meter;
    if (first) meters.set(s.name, (meter = new stemflow.RateMeter()));
    const bps = meter.update(Number(s.bytes) || 0, now);

    const watch = `/watch/${encodeURIComponent(s.name)}`;
    const origin = el('td', {}, el('span', { textContent: s.origin || '?' }));
    if (s.origin && s.origin === here) {
      origin.append(' ', el('span', { className: 'tag local', textContent: 'published here' }));
    } else if (s.local) {
      origin.append(' ', el('span', { className: 'tag local', textContent: 'flowing here', title: 'Relayed to this datacenter for its viewers' }));
    }
    const hops = Array.isArray(s.hops) && s.hops.length ? s.hops.join(' → ') : '–';
    const tracks = el('td');
    for (const t of Array.isArray(s.tracks) ? s.tracks : []) {
      tracks.append(el('span', { className: 'tag', textContent: trackLabel(t) }));
    }
    if (s.b_frames) {
      tracks.append(el('span', {
        className: 'tag warn b-frames',
        textContent: 'B-frames: no browser playback',
        title: 'The H264 video has B-frames, which browsers do not decode over WebRTC. ' +
          'The publisher fixes it with ffmpeg -bf 0 (or -tune zerolatency). RTSP players play it as it is.',
      }));
    }
    return el('tr', {},
      el('td', { className: 'name' }, el('a', { href: watch, textContent: s.name })),
      origin,
      el('td', { className: 'path', textContent: hops }),
      tracks,
      viewersCell(s),
      el('td', { className: 'num', textContent: first || !s.local ? '–' : stemflow.formatBitrate(bps) }),
      el('td', { className: 'num' }, el('a', { href: watch, textContent: 'Watch ▸' })),
    );
  }

  async function refresh() {
    try {
      const { datacenter, streams } = await stemflow.fetchStreams();
      stemflow.showDatacenter(datacenter);
      streams.sort((x, y) => String(x.name).localeCompare(String(y.name)));
      const now = Date.now();
      rows.replaceChildren(...streams.map((s) => row(s, datacenter, now)));
      for (const n of meters.keys()) {
        if (!streams.some((s) => s.name === n)) meters.delete(n);
      }
      table.hidden = streams.length === 0;
      empty.hidden = streams.length !== 0;
      listError.hidden = true;
      updated.textContent = `${streams.length} live · updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      listError.textContent = `Cannot load the stream list: ${err.message}. Retrying…`;
      listError.hidden = false;
    }
  }

  function go(page) {
    if (!input.reportValidity()) return;
    location.href = `/${page}/${encodeURIComponent(input.value.trim())}`;
  }
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    go('publish');
  });
  document.getElementById('watch-name').addEventListener('click', () => go('watch'));

  async function loop() {
    for (;;) {
      await refresh();
      await stemflow.sleep(document.hidden ? REFRESH * 3 : REFRESH);
    }
  }
  loop();
})();
