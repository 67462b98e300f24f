// Stemflow: helpers shared by the pages — WHIP/WHEP signalling (RFC 9725),
// retry timing, number formatting, and the datacenter badge in the top bar.
'use strict';

const stemflow = (() => {
  /** An HTTP error answer from the node, with its status and the server's message. */
  class HTTPError extends Error {
    constructor(status, message) {
      super(message);
      this.name = 'HTTPError';
      this.status = status;
    }
  }

  /** Resolves after ms milliseconds, or at once when signal aborts. */
  function sleep(ms, signal) {
    return new Promise((resolve) => {
      if (signal && signal.aborted) return resolve();
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        if (signal) signal.removeEventListener('abort', done);
        resolve();
      }
      if (signal) signal.addEventListener('abort', done);
    });
  }

  /** Exponential backoff with ±20 % jitter: base·2^attempt, capped at max (ms). */
  function backoff(attempt, base = 1000, max = 10000) {
    const ms = Math.min(max, base * 2 ** Math.min(attempt, 10));
    return Math.round(ms * (0.8 + 0.4 * Math.random()));
  }

  /**
   * Resolves when pc has gathered its ICE candidates, or after timeoutMs: the
   * offer then carries every candidate and no trickle request is needed.
   */
  function iceGathered(pc, timeoutMs = 2000) {
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(finish, timeoutMs);
      function check() {
        if (pc.iceGatheringState === 'complete') finish();
      }
      function finish() {
        clearTimeout(timer);
        pc.removeEventListener('icegatheringstatechange', check);
        resolve();
      }
      pc.addEventListener('icegatheringstatechange', check);
    });
  }

  /**
   * Runs one WHIP or WHEP exchange: creates the offer on pc, POSTs it to
   * endpoint and applies the answer. Returns the absolute URL of the session
   * (the Location header) to DELETE when done. Throws HTTPError when the node
   * refuses, with the node's own message.
   */
  async function negotiate(pc, endpoint, signal) {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    const res = await fetch(endpoint, {
      method: 'POST',
      headers: { 'Content-Type': 'application/sdp' },
      body: pc.localDescription.sdp,
      signal,
    });
    const body = await res.text();
    if (res.status !== 201 && res.status !== 200) {
      throw new HTTPError(res.status, body.trim() || `${res.status} ${res.statusText}`);
    }
    const location = res.headers.get('Location');
    const session = location ? new URL(location, new URL(endpoint, window.location.href)).href : null;
    if (session) openSessions.add(session);
    try {
      await pc.setRemoteDescription({ type: 'answer', sdp: body });
    } catch (err) {
      endSession(session);
      throw new Error(`the server's answer was not accepted by the browser: ${err.message}`);
    }
    return session;
  }

  /** Sessions to end when the page goes away. */
  const openSessions = new Set();

  /**
   * Ends a WHIP/WHEP session with DELETE; best effort, and survives the page
   * unloading. The promise settles when the node answered, or after 1 s.
   */
  function endSession(url) {
    if (!url) return Promise.resolve();
    openSessions.delete(url);
    const done = fetch(url, { method: 'DELETE', keepalive: true }).catch(() => {});
    return Promise.race([done, sleep(1000)]);
  }

  /**
   * Reports why a connected session is over, or '' while it is not: the
   * connection failed, or the node closed it (its DTLS transport closed, as
   * when a WHEP stream ends).
   */
  function sessionEnded(pc) {
    const cs = pc.connectionState;
    if (cs === 'failed' || cs === 'closed') return `connection ${cs}`;
    for (const tr of pc.getTransceivers()) {
      const dtls = (tr.receiver && tr.receiver.transport) || (tr.sender && tr.sender.transport);
      if (dtls && (dtls.state === 'closed' || dtls.state === 'failed')) return 'the server closed the session';
    }
    return '';
  }

  window.addEventListener('pagehide', () => openSessions.forEach(endSession));

  /** Finds the stats of the selected ICE candidate pair in a getStats() report. */
  function selectedPair(report) {
    let pair = null;
    report.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        pair = report.get(s.selectedCandidatePairId) || pair;
      }
    });
    if (pair) return pair;
    report.forEach((s) => {
      if (!pair && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
    });
    return pair;
  }

  /** The codec name ("H264", "VP8", "opus") of an RTP stream stat, or "". */
  function codecName(report, rtpStat) {
    const codec = rtpStat && rtpStat.codecId ? report.get(rtpStat.codecId) : null;
    return codec ? codec.mimeType.replace(/^(video|audio)\//, '') : '';
  }

  /** Formats bits per second for people: "850 kb/s", "2.4 Mb/s". */
  function formatBitrate(bps) {
    if (!Number.isFinite(bps) || bps <= 0) return '0 kb/s';
    if (bps < 1e6) return `${Math.round(bps / 1e3)} kb/s`;
    return `${(bps / 1e6).toFixed(bps < 1e7 ? 1 : 0)} Mb/s`;
  }

  /** Measures a bitrate from a growing byte counter sampled over time. */
  class RateMeter {
    constructor() {
      this.bytes = 0;
      this.time = 0;
      this.bps = 0;
    }
    /** Records a new byte count at time t (ms) and returns the bitrate in bits per second. */
    update(bytes, t) {
      if (this.time && t > this.time && bytes >= this.bytes) {
        this.bps = ((bytes - this.bytes) * 8 * 1000) / (t - this.time);
      }
      this.bytes = bytes;
      this.time = t;
      return this.bps;
    }
  }

  /** Fetches the node's stream list: {datacenter, streams: [...]}. */
  async function fetchStreams(signal) {
    const res = await fetch('/api/v1/streams', { cache: 'no-store', signal });
    if (!res.ok) {
      const text = (await res.text()).trim();
      throw new HTTPError(res.status, text || `${res.status} ${res.statusText}`);
    }
    const data = await res.json();
    return { datacenter: data.datacenter || '', streams: Array.isArray(data.streams) ? data.streams : [] };
  }

  /** Shows the datacenter that serves the page in the top bar. */
  function showDatacenter(name) {
    const el = document.getElementById('datacenter');
    if (el && name) el.textContent = `datacenter ${name}`;
  }

  /** Sets a state pill's text and data-state attribute (used by the CSS). */
  function setPill(el, state) {
    el.textContent = state;
    el.dataset.state = state;
  }

  // Every page shows its datacenter; the index page refreshes it with the list.
  if (document.body.dataset.page !== 'index') {
    fetchStreams().then((d) => showDatacenter(d.datacenter), () => {});
  }

  return {
    HTTPError,
    sleep,
    backoff,
    negotiate,
    endSession,
    sessionEnded,
    selectedPair,
    codecName,
    formatBitrate,
    RateMeter,
    fetchStreams,
    showDatacenter,
    setPill,
    streamName: document.body.dataset.stream || '',
  };
})();
