// Stemflow watch page: plays /whep/{stream}, reconnects with backoff when the
// stream is not live, the connection fails or the picture stalls, and shows
// statistics from getStats() and the path the stream takes through the
// overlay with each hop's measured delay. Tests read window.stemflowStats.
'use strict';

(() => {
  const name = stemflow.streamName;
  const endpoint = `/whep/${encodeURIComponent(name)}`;

  const video = document.getElementById('video');
  const screen = document.getElementById('screen');
  const stateBox = document.getElementById('state');
  const stateText = document.getElementById('state-text');
  const stateDetail = document.getElementById('state-detail');
  const statsBox = document.getElementById('stats');
  const pill = document.getElementById('pill');

  const STATS_INTERVAL = 1000; // ms between getStats() samples
  // The page looks at the stream's flags in /api/v1/streams when a session
  // starts, then after 3 s, 9 s, 27 s and every 60 s: the node knows them
  // when it answers unless the publisher has only just started.
  const INFO_FIRST_DELAY = 3000;
  const INFO_MAX_DELAY = 60000;
  const FIRST_FRAME_TIMEOUT = 15000; // ms to wait for a first frame after answering
  const STALL_TIMEOUT = 6000; // ms without a new frame before reconnecting
  const DISCONNECTED_TIMEOUT = 5000; // ms in ICE "disconnected" before reconnecting
  const PATH_INTERVAL = 3000; // ms between looks at the stream's path and its hops' delays

  /**
   * What the page shows, refreshed every second. End-to-end tests poll it.
   * state: connecting | waiting | playing | reconnecting | unplayable
   */
  const stats = {
    state: 'connecting',
    message: '',
    detail: '',
    bFrames: false, // the stream has H264 B-frames, which browsers cannot play
    framesDecoded: 0,
    framesDropped: 0,
    videoWidth: 0,
    videoHeight: 0,
    fps: 0,
    bitrate: 0, // bits per second, audio and video
    rttMs: null,
    packetsLost: 0,
    videoCodec: '',
    audioCodec: '',
    connectionState: 'new',
    sessions: 0, // WHEP sessions opened
    lastEnd: '', // why the last session ended
    // The datacenters the stream crosses from its origin to the one that
    // serves this page, and each hop's measured one-way delay in ms (half
    // the link's RTT; null when not measured).
    path: [],
    pathHops: [], // [{from, to, delayMs}]
    updated: 0, // Date.now() of the last sample
  };
  window.stemflowStats = stats;

  function setState(state, text, detail = '') {
    stats.state = state;
    stats.message = text;
    stats.detail = detail;
    stemflow.setPill(pill, state);
    stateText.textContent = text;
    stateDetail.textContent = detail;
    stateBox.hidden = state === 'playing';
    stateBox.dataset.state = state;
    screen.classList.toggle('unplayable', state === 'unplayable');
  }

  /**
   * Tells the viewer that the stream has B-frames instead of showing the
   * 1–2 fps picture a browser makes of them. The session stays open (the
   * sound plays) and the message stays across reconnections until a session
   * decodes a stream without B-frames: a publisher who restarts with -bf 0
   * is seen playing at once.
   */
  function showBFrames() {
    setState('unplayable', 'This stream cannot play in a browser: its video has B-frames.',
      'Browsers do not decode H264 B-frames over WebRTC (the picture would stutter at 1–2 frames per second). ' +
      'The publisher fixes it by encoding without B-frames: add -bf 0 (or -tune zerolatency) to the ffmpeg command, ' +
      'or set bframes=0 in the x264 options. RTSP players such as ffplay or VLC play the stream as it is.');
  }

  /** Reads the stream's flags from the node; resolves true when it has B-frames. */
  async function hasBFrames() {
    const { streams } = await stemflow.fetchStreams();
    const s = streams.find((x) => x.name === name);
    return Boolean(s && s.b_frames);
  }

  // Controls.
  const unmute = document.getElementById('unmute');
  unmute.addEventListener('click', () => {
    video.muted = !video.muted;
    unmute.textContent = video.muted ? 'Unmute' : 'Mute';
    video.play().catch(() => {});
  });
  const toggleStats = document.getElementById('toggle-stats');
  toggleStats.addEventListener('click', () => {
    statsBox.hidden = !statsBox.hidden;
    toggleStats.setAttribute('aria-pressed', String(!statsBox.hidden));
  });
  document.getElementById('fullscreen').addEventListener('click', () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else screen.requestFullscreen().catch(() => {});
  });

  let rate = new stemflow.RateMeter();

  /** The measured one-way delay of a hop (half its link's RTT), or null. */
  function hopDelay(links, from, to) {
    const find = (a, b) => links.find((l) => l.from === a && l.to === b && !l.down);
    const l = find(from, to) || find(to, from);
    const rtt = l ? Number(l.rtt_ms) : NaN;
    return Number.isFinite(rtt) && rtt > 0 ? rtt / 2 : null;
  }

  /**
   * Reads the path the stream takes to this datacenter (its hops in
   * /api/v1/streams: the live path, also right after a failover) and the
   * measured links (/api/v1/topology).
   */
  async function refreshPath() {
    const [list, topo] = await Promise.all([
      stemflow.fetchStreams(),
      fetch('/api/v1/topology', { cache: 'no-store' }).then((r) => (r.ok ? r.json() : null)).catch(() => null),
    ]);
    const s = list.streams.find((x) => x.name === name);
    const path = s && Array.isArray(s.hops) ? s.hops.map(String) : [];
    const links = topo && Array.isArray(topo.links) ? topo.links : [];
    stats.path = path;
    stats.pathHops = path.slice(1).map((to, i) => ({ from: path[i], to, delayMs: hopDelay(links, path[i], to) }));
  }

  /** Clears the media figures when a session ends; the overlay hides. */
  function resetStats() {
    Object.assign(stats, {
      framesDecoded: 0, framesDropped: 0, videoWidth: 0, videoHeight: 0, fps: 0, bitrate: 0,
      rttMs: null, packetsLost: 0, videoCodec: '', audioCodec: '', connectionState: 'closed',
      path: [], pathHops: [],
    });
    rate = new stemflow.RateMeter();
    statsBox.textContent = '';
  }

  /** Samples pc.getStats() into stats and the overlay. */
  async function sample(pc) {
    const report = await pc.getStats();
    let v = null;
    let a = null;
    report.forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      if (s.kind === 'video') v = s;
      else if (s.kind === 'audio') a = s;
    });
    const pair = stemflow.selectedPair(report);
    const now = Date.now();

    stats.framesDecoded = v ? v.framesDecoded || 0 : 0;
    stats.framesDropped = v ? v.framesDropped || 0 : 0;
    stats.fps = v && v.framesPerSecond ? v.framesPerSecond : 0;
    stats.videoWidth = video.videoWidth || (v && v.frameWidth) || 0;
    stats.videoHeight = video.videoHeight || (v && v.frameHeight) || 0;
    stats.packetsLost = (v ? v.packetsLost || 0 : 0) + (a ? a.packetsLost || 0 : 0);
    stats.bitrate = rate.update((v ? v.bytesReceived || 0 : 0) + (a ? a.bytesReceived || 0 : 0), now);
    stats.rttMs = pair && pair.currentRoundTripTime !== undefined ? pair.currentRoundTripTime * 1000 : null;
    stats.videoCodec = stemflow.codecName(report, v);
    stats.audioCodec = stemflow.codecName(report, a);
    stats.connectionState = pc.connectionState;
    stats.updated = now;
    renderStats();
  }

  function renderStats() {
    const lines = [];
    if (stats.videoWidth) {
      lines.push(`${stats.videoWidth}×${stats.videoHeight}  ${Math.round(stats.fps)} fps`);
    }
    const codecs = [stats.videoCodec, stats.audioCodec].filter(Boolean).join(' + ');
    lines.push(`${codecs || 'no media yet'}  ${stemflow.formatBitrate(stats.bitrate)}`);
    const rtt = stats.rttMs === null ? '–' : `${stats.rttMs.toFixed(stats.rttMs < 10 ? 1 : 0)} ms`;
    lines.push(`RTT ${rtt}  lost ${stats.packetsLost}`);
    lines.push(`frames ${stats.framesDecoded}  dropped ${stats.framesDropped}`);
    if (stats.path.length) {
      lines.push(`path ${stats.path.join(' → ')}`);
      const hops = stats.pathHops.map((h) => `${h.from}→${h.to} ${h.delayMs === null ? '?' : `${h.delayMs.toFixed(h.delayMs < 10 ? 1 : 0)} ms`}`);
      if (hops.length) lines.push(`delay ${hops.join('  ')}`);
    }
    statsBox.textContent = lines.join('\n');
  }

  /**
   * Plays one WHEP session until it ends. Resolves with the reason it ended
   * (connection lost, picture stalled); throws when the node refuses the
   * session, e.g. HTTPError 404 when the stream is not live.
   */
  async function playSession() {
    const pc = new RTCPeerConnection();
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.addTransceiver('audio', { direction: 'recvonly' });
    const media = new MediaStream();
    pc.addEventListener('track', (e) => {
      media.addTrack(e.track);
      if (video.srcObject !== media) video.srcObject = media;
      video.play().catch(() => {}); // autoplay is allowed: the element is muted
    });

    let session = null;
    try {
      session = await stemflow.negotiate(pc, endpoint);
      stats.sessions++;
      return await watchSession(pc);
    } finally {
      await stemflow.endSession(session); // before closing, so the node sees an orderly end
      pc.close();
      resetStats();
    }
  }

  /** Resolves when the connection or a DTLS transport of pc changes state. */
  function transportChange(pc) {
    return new Promise((resolve) => {
      const targets = [pc];
      for (const tr of pc.getTransceivers()) {
        if (tr.receiver && tr.receiver.transport) targets.push(tr.receiver.transport);
      }
      const done = () => {
        for (const t of targets) t.removeEventListener(t === pc ? 'connectionstatechange' : 'statechange', done);
        resolve();
      };
      for (const t of targets) t.addEventListener(t === pc ? 'connectionstatechange' : 'statechange', done);
      setTimeout(done, STATS_INTERVAL);
    });
  }

  /** Samples a live session every second and resolves once it is over. */
  async function watchSession(pc) {
    const opened = Date.now();
    let lastFrames = 0;
    let lastFrameAt = 0;
    let disconnectedSince = 0;
    let nextInfo = 0;
    let nextPath = 0;
    let infoDelay = INFO_FIRST_DELAY;
    // The node knows the flags of the stream it serves by the time it
    // answered; a stream that starts without B-frames may still get them.
    stats.bFrames = false;
    for (;;) {
      if (!stats.bFrames && Date.now() >= nextInfo) {
        nextInfo = Date.now() + infoDelay;
        infoDelay = Math.min(infoDelay * 3, INFO_MAX_DELAY);
        if (await hasBFrames().catch(() => false)) {
          stats.bFrames = true;
          showBFrames();
        }
      }
      if (Date.now() >= nextPath) {
        nextPath = Date.now() + PATH_INTERVAL;
        refreshPath().catch(() => {}); // not awaited: a slow answer never holds the stats
      }
      await Promise.race([stemflow.sleep(STATS_INTERVAL), transportChange(pc)]);
      const now = Date.now();
      const ended = stemflow.sessionEnded(pc);
      if (ended) return ended;
      if (pc.connectionState === 'disconnected') {
        disconnectedSince = disconnectedSince || now;
        if (now - disconnectedSince > DISCONNECTED_TIMEOUT) return 'connection lost';
      } else {
        disconnectedSince = 0;
      }

      await sample(pc).catch(() => {});

      if (stats.framesDecoded > lastFrames) {
        lastFrames = stats.framesDecoded;
        lastFrameAt = now;
        if (stats.state !== 'playing' && !stats.bFrames) setState('playing', 'Playing');
      }
      if (!lastFrameAt && now - opened > FIRST_FRAME_TIMEOUT) return 'no picture arrived';
      if (lastFrameAt && now - lastFrameAt > STALL_TIMEOUT) {
        return 'the picture stopped (the stream may have ended)';
      }
    }
  }

  /** Keeps a session going for as long as the page is open. */
  async function run() {
    let attempt = 0;
    for (;;) {
      if (stats.state !== 'waiting' && stats.state !== 'unplayable') {
        setState(stats.sessions ? 'reconnecting' : 'connecting', 'Connecting…');
      }
      let wait;
      try {
        const reason = await playSession();
        stats.lastEnd = reason;
        const played = stats.state === 'playing' || stats.state === 'unplayable';
        if (stats.state !== 'unplayable') setState('reconnecting', 'Reconnecting…', `The connection ended: ${reason}.`);
        if (played) attempt = 0;
        wait = stemflow.backoff(attempt++, 500, 5000);
      } catch (err) {
        if (err instanceof stemflow.HTTPError && err.status === 404) {
          // Not live (yet, or any more): poll at a steady pace.
          setState('waiting', `Waiting for “${name}” to go live…`, 'The page starts playing as soon as someone publishes it.');
          wait = stemflow.backoff(0, 2000, 2000);
        } else {
          const why = err instanceof stemflow.HTTPError ? `the server answered ${err.status}: ${err.message}` : err.message;
          setState('reconnecting', 'Cannot connect, retrying…', `${why}`);
          wait = stemflow.backoff(attempt++, 1000, 10000);
        }
      }
      await stemflow.sleep(wait);
    }
  }

  run();
})();
