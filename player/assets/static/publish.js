// Stemflow publish page: captures the camera and microphone (or a screen) and
// publishes them with WHIP to /whip/{stream}, preferring H264. With
// ?autostart=1 it publishes the camera and microphone without a click.
// Tests read window.stemflowPublish.
'use strict';

(() => {
  const name = stemflow.streamName;
  const endpoint = `/whip/${encodeURIComponent(name)}`;

  const preview = document.getElementById('preview');
  const idleHint = document.getElementById('idle-hint');
  const statsBox = document.getElementById('stats');
  const pill = document.getElementById('pill');
  const statusLine = document.getElementById('status');
  const errorBox = document.getElementById('error');
  const sourceSelect = document.getElementById('source');
  const startButton = document.getElementById('start');
  const stopButton = document.getElementById('stop');

  const STATS_INTERVAL = 1000; // ms between getStats() samples
  const CONNECT_TIMEOUT = 15000; // ms for ICE and DTLS to connect after the answer
  const DISCONNECTED_TIMEOUT = 5000; // ms in "disconnected" before starting over

  /**
   * What the page shows. End-to-end tests poll it.
   * state: idle | starting | connecting | live | reconnecting | error
   */
  const pub = {
    state: 'idle',
    error: '',
    errorStatus: 0, // HTTP status of the last refusal, e.g. 409
    videoCodec: '',
    audioCodec: '',
    framesEncoded: 0,
    frameWidth: 0,
    frameHeight: 0,
    fps: 0,
    bitrate: 0,
    rttMs: null,
    encoder: '',
    sessions: 0,
  };
  window.stemflowPublish = pub;

  let media = null; // the MediaStream being published
  let abort = null; // AbortController of the running publish loop

  function setState(state, status) {
    pub.state = state;
    stemflow.setPill(pill, state);
    statusLine.textContent = status || '';
    const running = abort !== null;
    startButton.disabled = running;
    sourceSelect.disabled = running;
    stopButton.disabled = !running;
  }

  function showError(message, status = 0) {
    pub.error = message;
    pub.errorStatus = status;
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  /** Asks the browser for the chosen source. */
  async function capture(source) {
    if (source === 'screen') {
      return navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 30 }, audio: true });
    }
    return navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      audio: true,
    });
  }

  /** Turns a getUserMedia/getDisplayMedia failure into advice. */
  function describeCaptureError(err, source) {
    const what = source === 'screen' ? 'screen' : 'camera and microphone';
    switch (err && err.name) {
      case 'NotAllowedError':
        return `Access to the ${what} was refused. Allow it in the browser's site settings and press Start again.`;
      case 'NotFoundError':
        return `No ${what} found. Connect one, or choose another source.`;
      case 'NotReadableError':
        return `The ${what} is busy or failed to start. Close other programs that use it and try again.`;
      default:
        if (!window.isSecureContext) {
          return 'Capture needs a secure page: open this page over https, or on localhost.';
        }
        return `Cannot capture the ${what}: ${err && err.message ? err.message : err}`;
    }
  }

  /** Turns a refusal by the node into advice. */
  function describeRefusal(err) {
    if (err.status === 409) {
      return `The name “${name}” is already being published, here or in another datacenter. ` +
        `Choose another name, or stop the other publisher first.\nThe server said: ${err.message}`;
    }
    return `The server refused to publish (${err.status}): ${err.message}`;
  }

  /** Orders the browser's video codecs so that H264 comes first, then VP8. */
  function preferH264(transceiver) {
    if (!transceiver.setCodecPreferences || !RTCRtpSender.getCapabilities) return;
    const caps = RTCRtpSender.getCapabilities('video');
    if (!caps || !caps.codecs.some((c) => c.mimeType.toLowerCase() === 'video/h264')) return;
    const rank = (c) => {
      const mime = c.mimeType.toLowerCase();
      const fmtp = c.sdpFmtpLine || '';
      if (mime === 'video/h264') {
        // Constrained baseline with packetization-mode=1 is what everyone decodes.
        return (/packetization-mode=1/.test(fmtp) ? 0 : 2) + (/profile-level-id=42e0/.test(fmtp) ? 0 : 1);
      }
      if (mime === 'video/vp8') return 4;
      return 5; // other codecs, and rtx/red/ulpfec, keep their order after
    };
    try {
      transceiver.setCodecPreferences(caps.codecs.slice().sort((x, y) => rank(x) - rank(y)));
    } catch (err) {
      console.warn('stemflow: cannot set codec preferences, the browser chooses', err);
    }
  }

  function newPeerConnection() {
    const pc = new RTCPeerConnection();
    for (const track of media.getTracks()) {
      const tr = pc.addTransceiver(track, { direction: 'sendonly', streams: [media] });
      if (track.kind === 'video') preferH264(tr);
    }
    return pc;
  }

  const rate = new stemflow.RateMeter();

  async function sample(pc) {
    const report = await pc.getStats();
    let v = null;
    let a = null;
    report.forEach((s) => {
      if (s.type !== 'outbound-rtp') return;
      if (s.kind === 'video' && (!v || (s.frameWidth || 0) > (v.frameWidth || 0))) v = s;
      else if (s.kind === 'audio') a = s;
    });
    const pair = stemflow.selectedPair(report);
    pub.framesEncoded = v ? v.framesEncoded || 0 : 0;
    pub.frameWidth = v ? v.frameWidth || 0 : 0;
    pub.frameHeight = v ? v.frameHeight || 0 : 0;
    pub.fps = v && v.framesPerSecond ? v.framesPerSecond : 0;
    pub.encoder = v && v.encoderImplementation ? v.encoderImplementation : '';
    pub.videoCodec = stemflow.codecName(report, v);
    pub.audioCodec = stemflow.codecName(report, a);
    pub.bitrate = rate.update((v ? v.bytesSent || 0 : 0) + (a ? a.bytesSent || 0 : 0), Date.now());
    pub.rttMs = pair && pair.currentRoundTripTime !== undefined ? pair.currentRoundTripTime * 1000 : null;

    const codecs = [pub.videoCodec, pub.audioCodec].filter(Boolean).join(' + ');
    const rtt = pub.rttMs === null ? '–' : `${pub.rttMs.toFixed(pub.rttMs < 10 ? 1 : 0)} ms`;
    statsBox.textContent = [
      pub.frameWidth ? `${pub.frameWidth}×${pub.frameHeight}  ${Math.round(pub.fps)} fps` : 'no video yet',
      `${codecs || 'negotiating'}  ${stemflow.formatBitrate(pub.bitrate)}`,
      `RTT ${rtt}  frames ${pub.framesEncoded}`,
    ].join('\n');
  }

  /** Watches a published session; resolves with the reason it ended. */
  async function watchSession(pc, signal) {
    const opened = Date.now();
    let disconnectedSince = 0;
    while (!signal.aborted) {
      const cs = pc.connectionState;
      const now = Date.now();
      const ended = stemflow.sessionEnded(pc);
      if (ended) return ended;
      if (cs === 'connected') {
        disconnectedSince = 0;
        if (pub.state !== 'live') {
          setState('live', 'Live: viewers in every datacenter can watch now.');
          showError('');
        }
      } else if (cs === 'disconnected') {
        disconnectedSince = disconnectedSince || now;
        if (now - disconnectedSince > DISCONNECTED_TIMEOUT) return 'connection lost';
      } else if (pub.state !== 'live' && now - opened > CONNECT_TIMEOUT) {
        return 'could not connect to the server (ICE or DTLS did not complete)';
      }
      statsBox.hidden = false;
      await sample(pc).catch(() => {});
      await stemflow.sleep(STATS_INTERVAL, signal);
    }
    return 'stopped';
  }

  /** Publishes until stopped, starting over after a lost connection. */
  async function publishLoop(signal) {
    let attempt = 0;
    while (!signal.aborted) {
      setState(pub.sessions ? 'reconnecting' : 'connecting', 'Connecting to the server…');
      let pc = null;
      let session = null;
      try {
        pc = newPeerConnection();
        session = await stemflow.negotiate(pc, endpoint, signal);
        pub.sessions++;
        const reason = await watchSession(pc, signal);
        if (signal.aborted) break;
        if (pub.state === 'live') attempt = 0;
        showError(`Publishing was interrupted: ${reason}. Reconnecting…`);
      } catch (err) {
        if (signal.aborted) break;
        if (err instanceof stemflow.HTTPError && err.status >= 400 && err.status < 500) {
          // The node refused (name taken, bad offer): retrying would not help.
          showError(describeRefusal(err), err.status);
          stop('error');
          return;
        }
        showError(`Cannot publish: ${err.message}. Retrying…`);
      } finally {
        await stemflow.endSession(session); // before closing, so the node sees an orderly end
        if (pc) pc.close();
      }
      await stemflow.sleep(stemflow.backoff(attempt++, 1000, 10000), signal);
    }
  }

  async function start() {
    if (abort) return;
    const source = sourceSelect.value;
    showError('');
    abort = new AbortController();
    setState('starting', source === 'screen' ? 'Choose a screen to share…' : 'Asking for the camera and microphone…');
    const signal = abort.signal;
    try {
      media = await capture(source);
    } catch (err) {
      abort = null;
      setState('error', '');
      showError(describeCaptureError(err, source));
      return;
    }
    if (signal.aborted) {
      media.getTracks().forEach((t) => t.stop());
      media = null;
      return;
    }
    // Stopping the share from the browser's own bar ends the publication.
    media.getVideoTracks().forEach((t) => t.addEventListener('ended', () => stop('idle', 'The source was closed.')));
    preview.srcObject = media;
    idleHint.hidden = true;
    publishLoop(signal);
  }

  function stop(state = 'idle', status = 'Stopped.') {
    if (abort) abort.abort();
    abort = null;
    if (media) media.getTracks().forEach((t) => t.stop());
    media = null;
    preview.srcObject = null;
    idleHint.hidden = false;
    statsBox.hidden = true;
    setState(state, state === 'error' ? '' : status);
  }

  startButton.addEventListener('click', start);
  stopButton.addEventListener('click', () => stop());

  setState('idle', '');
  if (new URLSearchParams(location.search).get('autostart') === '1') {
    sourceSelect.value = 'camera';
    start();
  }
})();
