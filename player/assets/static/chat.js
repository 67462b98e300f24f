// Stemflow: the chat panel beside the video (docs/chat.md has the protocol).
// Text only: every message is put in the page with textContent, never as HTML.
'use strict';

(() => {
  const panel = document.getElementById('chat');
  if (!panel) return;
  const room = document.body.dataset.stream;
  const log = document.getElementById('chat-log');
  const state = document.getElementById('chat-state');
  const note = document.getElementById('chat-note');
  const unreadBtn = document.getElementById('chat-unread');
  const nickForm = document.getElementById('chat-nick-form');
  const nickInput = document.getElementById('chat-nick');
  const sendForm = document.getElementById('chat-send-form');
  const textInput = document.getElementById('chat-text');

  const NICK_KEY = 'stemflow-chat-nick';
  const PING_EVERY = 1000; // ms: an app ping, answered with pong
  const DEAD_AFTER = 3000; // ms without any frame: the node is gone, reconnect

  let ws = null;
  let epoch = '';
  let lastSeq = null; // seq of the last message shown; null before the first join
  let nick = localStorage.getItem(NICK_KEY) || '';
  let attempt = 0;
  let lastHeard = 0;
  let pingTimer = 0;
  let unread = 0;
  let unreadMark = null;
  let nextId = 0;
  let connects = 0;
  const idPrefix = Math.random().toString(36).slice(2, 10) + '-';
  // Messages sent and not acked yet, by id: sent again (same id) after a
  // reconnect, until acked.
  const pending = new Map(); // id → {text, li}
  const local = new Map(); // id → li shown at once for a message sent here, until its msg comes
  const shown = new Set(); // ids of the messages in the log

  function setState(text, cls) {
    state.textContent = text;
    state.className = 'chat-state ' + (cls || '');
  }

  function showNote(text) {
    note.textContent = text;
    note.hidden = !text;
  }

  function updateStatus() {
    const open = ws && ws.readyState === WebSocket.OPEN && lastSeq !== null;
    if (!open) {
      setState(pending.size ? `disconnected — ${pending.size} pending, reconnecting…` : 'disconnected — reconnecting…', 'down');
    } else if (pending.size) {
      setState(`${pending.size} message${pending.size > 1 ? 's' : ''} pending`, 'pending');
    } else {
      setState('connected', 'up');
    }
  }

  function atBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 30;
  }

  function scrollDown() {
    log.scrollTop = log.scrollHeight;
    unread = 0;
    unreadBtn.hidden = true;
  }

  function sysLine(text) {
    const li = document.createElement('li');
    li.className = 'sys';
    li.textContent = text;
    append(li, false);
  }

  function append(li, countUnread) {
    const stick = atBottom();
    log.appendChild(li);
    if (stick) {
      scrollDown();
    } else if (countUnread) {
      if (unread === 0) {
        unreadMark = document.createElement('li');
        unreadMark.className = 'unread-mark';
        unreadMark.textContent = 'new';
        log.insertBefore(unreadMark, li);
      }
      unread++;
      unreadBtn.textContent = `${unread} new message${unread > 1 ? 's' : ''} ↓`;
      unreadBtn.hidden = false;
    }
  }

  function messageItem(m, isPending) {
    const li = document.createElement('li');
    if (m.nick === nick) li.classList.add('mine');
    if (isPending) li.classList.add('pending');
    const who = document.createElement('span');
    who.className = 'nick';
    who.textContent = m.nick;
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = m.text;
    li.append(who, text);
    if (m.ts) li.title = new Date(m.ts).toLocaleString();
    if (m.seq) li.dataset.seq = String(m.seq);
    return li;
  }

  function onMessage(m) {
    if (lastSeq !== null && m.seq <= lastSeq) return; // had it
    lastSeq = m.seq;
    pending.delete(m.id);
    const mine = local.get(m.id);
    if (mine) {
      local.delete(m.id);
      mine.remove(); // shown again below, in sequence order
    }
    if (shown.has(m.id)) return;
    shown.add(m.id);
    append(messageItem(m, false), !mine);
    updateStatus();
  }

  function send(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
  }

  function onFrame(f) {
    lastHeard = Date.now();
    switch (f.type) {
      case 'joined':
        attempt = 0;
        if (f.epoch !== epoch && epoch !== '') {
          log.replaceChildren();
          shown.clear();
          lastSeq = null;
        }
        epoch = f.epoch;
        if (lastSeq === null) lastSeq = f.first_seq - 1;
        if (nick) send({type: 'nick', nick});
        for (const [id, p] of pending) send({type: 'send', id, text: p.text});
        updateStatus();
        break;
      case 'msg':
        onMessage(f);
        break;
      case 'ack': {
        const p = pending.get(f.id);
        if (p) {
          pending.delete(f.id);
          p.li.classList.remove('pending');
        }
        updateStatus();
        break;
      }
      case 'nick_ok':
        showNote('');
        break;
      case 'error':
        switch (f.code) {
          case 'rate_limited': // not sent: again in a moment, same id
            setTimeout(() => { const p = pending.get(f.id); if (p) send({type: 'send', id: f.id, text: p.text}); }, 1000);
            showNote('Slow down: too many messages at once.');
            break;
          case 'history_gap':
            sysLine('Older messages are no longer kept.');
            break;
          case 'epoch_changed':
            log.replaceChildren();
            shown.clear();
            lastSeq = null;
            sysLine('The chat history was reset.');
            break;
          case 'bad_nick':
          case 'no_nick':
            showNote(f.message);
            nickForm.hidden = false;
            sendForm.hidden = true;
            break;
          default: {
            showNote(f.message);
            const p = f.id && pending.get(f.id);
            if (p) { // refused for good: too long, empty…
              pending.delete(f.id);
              local.delete(f.id);
              p.li.remove();
            }
          }
        }
        updateStatus();
        break;
    }
  }

  function connect() {
    const u = new URL(`/chat/${encodeURIComponent(room)}`, location.href);
    u.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    if (nick) u.searchParams.set('nick', nick);
    if (lastSeq !== null) {
      u.searchParams.set('since', String(lastSeq));
      u.searchParams.set('epoch', epoch);
    }
    const sock = new WebSocket(u);
    ws = sock;
    connects++;
    lastHeard = Date.now();
    sock.onmessage = (ev) => {
      if (sock !== ws) return;
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      onFrame(f);
    };
    sock.onclose = () => {
      if (sock !== ws) return;
      ws = null;
      updateStatus();
      const ms = stemflow.backoff(attempt++, 300, 5000);
      setTimeout(connect, ms);
    };
    sock.onopen = () => updateStatus();
  }

  // Notice a dead node within ~3 s: pings every second, any frame counts.
  pingTimer = setInterval(() => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > DEAD_AFTER) {
      const dead = ws;
      ws = null;
      dead.close();
      updateStatus();
      setTimeout(connect, 100);
      return;
    }
    send({type: 'ping'});
  }, PING_EVERY);

  function useNick(n) {
    nick = n;
    localStorage.setItem(NICK_KEY, n);
    nickForm.hidden = true;
    sendForm.hidden = false;
    send({type: 'nick', nick});
  }

  nickForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const n = nickInput.value.trim();
    if (n) useNick(n);
  });

  sendForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = textInput.value;
    if (!text.trim()) return;
    textInput.value = '';
    const id = idPrefix + (nextId++);
    const li = messageItem({nick, text}, true);
    pending.set(id, {text, li});
    local.set(id, li);
    append(li, false);
    scrollDown();
    send({type: 'send', id, text});
    updateStatus();
  });

  unreadBtn.addEventListener('click', () => {
    if (unreadMark) unreadMark.scrollIntoView();
    scrollDown();
  });
  log.addEventListener('scroll', () => {
    if (atBottom()) {
      unread = 0;
      unreadBtn.hidden = true;
    }
  });

  // For tests and the console: the panel's state, and a way to drop the
  // connection as a dead node would (the panel reconnects with since).
  window.stemflowChat = {
    state: () => ({epoch, lastSeq: lastSeq || 0, pending: pending.size, connects}),
    drop: () => {
      const s = {epoch, lastSeq: lastSeq || 0, pending: pending.size, connects};
      if (ws) ws.close();
      return s;
    },
  };

  if (nick) {
    nickInput.value = nick;
    nickForm.hidden = true;
    sendForm.hidden = false;
  }
  connect();
  window.addEventListener('beforeunload', () => clearInterval(pingTimer));
})();
